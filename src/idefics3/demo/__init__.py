"""Small self-contained models for trying idefics3 on a machine without downloaded weights."""
