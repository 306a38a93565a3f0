"""The run config: one YAML file, pydantic sections that reject unknown keys, dotted overrides, the train section."""

from sft.config.load import apply_overrides, load_config, parse_override, read_yaml, to_yaml, validate_config, yaml_load
from sft.config.schema import (
    AdapterConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    FormatName,
    ModelConfig,
    OutputConfig,
    RowTemplate,
    RunConfig,
    SourceConfig,
    TinyModelSpec,
)
from sft.errors import did_you_mean  # its old home was here
