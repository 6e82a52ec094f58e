"""lmms-eval task templates that read mmdomain shards (through an index `mmdomain lmms-task` writes), and their scoring."""
