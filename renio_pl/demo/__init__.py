"""The embedded demo: a task, tokenizer and teacher built offline on CPU (used only by configs/demo*.yaml)."""
