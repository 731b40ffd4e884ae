"""VideoMamba models (being written)."""
