"""Input pipelines (MindSpore dataset ops); the scan that precedes them is host.datascan."""
