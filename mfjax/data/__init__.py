"""Events: the schema, readers for Weibo (rumdect, CED) and generic JSONL, and validation."""
