"""Typed errors for the whole project.

Every error says what was wrong, where (file, tensor, row, option) and, when it
helps, what to do. Callers catch ``HLWQError`` to show a one-line message.
"""


class HLWQError(Exception):
    """Base class: the message is complete and safe to show to a user."""


class InvalidTensorError(HLWQError, ValueError):
    """A tensor cannot be quantized: wrong rank, empty, wrong dtype, non-finite."""


class NonFiniteTensorError(InvalidTensorError):
    """A tensor holds NaN or Inf values."""


class InvalidOptionError(HLWQError, ValueError):
    """An option is outside its allowed range (bits, block size, mode, size...)."""


class CorruptCheckpointError(HLWQError):
    """A safetensors file (or index) is inconsistent: header, offsets, duplicates."""


class SourceError(HLWQError):
    """A checkpoint source cannot be read: missing path, unknown repo or revision."""


class UnsafeSourceError(SourceError):
    """A source entry may not be read: a link leading outside the source, a special file,
    or a pickle (loading one runs code)."""


class AuthenticationError(SourceError):
    """The Hub refused access: a token is missing or not allowed."""


class PolicyError(HLWQError, ValueError):
    """A bit policy file or pattern is invalid."""


class ArtifactError(HLWQError):
    """A packed artifact is unsound: manifest, hashes, paths, format version."""


class UnsafePathError(ArtifactError):
    """A path in a manifest points outside the artifact."""


class BudgetError(HLWQError, ValueError):
    """A size budget cannot be parsed or cannot be met."""


class InsufficientDiskError(HLWQError):
    """The disk lacks room for a run's output and staging."""


class GateFailedError(HLWQError):
    """A validation gate failed; the message names the tensors, prompts or blocks."""


class PromptFileError(HLWQError, ValueError):
    """A prompt file cannot be read at all (not a bad row: those are reported per row)."""


class MissingDependencyError(HLWQError):
    """An optional library a command needs (a benchmark extra) is not installed."""


class OutputLockedError(HLWQError):
    """Another run holds the lock of an output or staging folder (run with --no-wait)."""


class CatalogError(HLWQError):
    """A render catalog part cannot be read."""


class LoraError(HLWQError, ValueError):
    """A LoRA cannot be used: not safetensors, unknown keys, targets or shapes the model lacks,
    or an operation (fusing) that packed weights cannot take without re-quantizing."""
