"""Did the fine-tune help: held-out loss and generations scored against the labels, base vs tuned, and the report."""

from sft.evaluate.report import METRICS, plot_training, report_markdown, write_report
from sft.evaluate.scores import (
    Scores,
    decoding_config,
    evaluate,
    generate,
    heldout_loss,
    rouge_l,
    run_benchmarks,
    score,
    token_f1,
)
