"""Training machinery for VideoMamba: configs, data, stage tasks, engine, launch, tracking, evaluation."""
