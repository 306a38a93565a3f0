"""The stages composed: `sft train` (data -> model -> tokens -> train -> evaluate -> export), `sft eval`, `sft data`."""

from sft.pipeline.run import (
    PLANNED,
    eval_run,
    failure_recorded,
    latest_run,
    planned,
    resumable_run,
    sources_of,
    train_run,
)
