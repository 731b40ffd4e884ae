"""Zero-shot text-video retrieval: annotations, feature extraction, scoring, metrics and reports.

`retrieval_metrics` is the public metric function; `pipeline.evaluation.run.evaluate_retrieval` runs a
whole evaluation from an `EvalRetrievalConfig` (imported lazily there: it pulls in models and data).
"""

from pipeline.evaluation.metrics import retrieval_metrics

__all__ = ["retrieval_metrics"]
