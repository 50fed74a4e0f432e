"""The file dialogs' filters, one home for each kind of file the window opens or writes."""

EVAL_DATA_FILTER = "Evaluation data (*.jsonl *.json *.csv *.parquet);;All files (*)"
TRAIN_DATA_FILTER = "Training data (*.jsonl *.json *.csv *.parquet);;All files (*)"
GGUF_FILTER = "GGUF files (*.gguf);;All files (*)"
REPORT_FILTER = "HTML report (*.html);;Markdown (*.md);;JSON lines (*.jsonl);;CSV (*.csv);;JSON (*.json)"
