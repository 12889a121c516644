"""Import a Hugging Face Llama-format folder (or a zip of one) as an Apertis bundle: the inverse of the
`hf-llama` export (apertis_core.export).

The folder holds config.json (model_type "llama"), the weights as model.safetensors or sharded
*.safetensors (with model.safetensors.index.json), and tokenizer.json. Nothing here needs `transformers`:
the three are read directly. Everything is checked before the model is built: the config maps onto a
softmax-attention transformer (RoPE, GQA, SwiGLU, RMSNorm), the model fits in memory (sizing), every
weight file's header is sound and names each tensor with the shape the config gives it.

The tokenizer must be byte-level BPE (GPT-2 / Llama 3 style). Apertis needs its own special tokens
(<|eot|>, <|pad|>, <image>, <|system|>, <|user|>, <|assistant|>): the ones a tokenizer lacks are added
after its vocabulary, and the embedding (and output head) grow by rows set to the mean of the existing
ones, so the logits of the original tokens are unchanged. The imported model chats in the Apertis format
(`<|role|>content<|eot|>`), not the source's chat template: a chat model needs fine-tuning on that format
before it stops at <|eot|> by itself.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from . import sizing
from .bundle import (
    MAX_CONFIG_BYTES,
    MAX_TOKENIZER_BYTES,
    BundleError,
    _read_header,
    save_bundle,
)
from .bundle_zip import IMPORT_POLICY
from .configio import ConfigError
from .data.archive import check_zip, safe_extract
from .model import ApertisModel, ModelConfig
from .tokenizer import SPECIAL_TOKENS, Tokenizer

INDEX_FILE = "model.safetensors.index.json"
# What an import reads from a Llama folder (everything else, pickled *.bin weights included, is left out).
_READ_FILES = ("config.json", "tokenizer.json", INDEX_FILE)
_MAX_INDEX_BYTES = 16 << 20


class ImportError_(BundleError):  # noqa: N801 - not the builtin ImportError
    """A folder that cannot be imported as an Apertis model; the message says why and what to do."""


# ---- config -------------------------------------------------------------------------------------------
def is_hf_config(data: Any) -> bool:
    """Whether a parsed config.json is a Hugging Face one (not an Apertis bundle's)."""
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data) and "preset" not in data


def _rope(hf: dict[str, Any], where: str) -> tuple[float, float]:
    """(rope_theta, linear scaling factor) from either the older rope_theta/rope_scaling keys or
    transformers 5's rope_parameters."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ImportError_(f"{where}: rope_parameters / rope_scaling must be JSON objects")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        factor = 1.0
    elif kind == "linear":
        factor = merged.get("factor", 1.0)
    else:
        raise ImportError_(
            f"{where}: RoPE scaling type {kind!r} is not supported (Apertis has plain RoPE with optional linear "
            "scaling). Import a model without rope_scaling, or set it to linear / remove it in config.json if "
            "you accept different long-context behaviour"
        )
    try:
        return float(theta), float(factor)
    except (TypeError, ValueError):
        raise ImportError_(f"{where}: rope_theta {theta!r} / factor {factor!r} are not numbers") from None


def llama_model_config(hf: dict[str, Any], vocab_size: int | None = None, where: str = "config.json") -> ModelConfig:
    """ModelConfig for a HF LlamaConfig mapping (`vocab_size` overrides the config's, after tokens were
    added); ImportError_ naming what does not map and what to do."""
    if not isinstance(hf, dict):
        raise ImportError_(f"{where}: expected a JSON object of model settings")
    model_type = hf.get("model_type")
    if model_type != "llama":
        arch = ", ".join(map(str, hf.get("architectures") or [])) or "unknown architecture"
        if "preset" in hf:
            raise ImportError_(f"{where}: this is already an Apertis bundle; load it directly, no import needed")
        raise ImportError_(
            f"{where}: model_type is {model_type!r} ({arch}); only Llama-architecture models (model_type "
            "'llama', LlamaForCausalLM) can be imported. Convert the model to Llama format first, or train an "
            "Apertis model instead"
        )
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} (Apertis' SwiGLU uses silu)")
    if hf.get("attention_bias"):
        problems.append("attention_bias (Apertis' attention projections have no biases)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias (Apertis' feed-forward layers have no biases)")
    if hf.get("sliding_window"):
        problems.append(f"sliding_window {hf.get('sliding_window')}")
    if problems:
        raise ImportError_(
            f"{where}: this Llama variant does not map onto an Apertis transformer: {'; '.join(problems)}. "
            "Only plain Llama models (no biases, silu, full attention) can be imported"
        )
    theta, factor = _rope(hf, where)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
    if missing:
        raise ImportError_(f"{where}: {', '.join(missing)} missing or not whole numbers; the config is damaged")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or 0
    mapping = {
        "preset": "custom",
        "vocab_size": vocab_size or hf["vocab_size"],
        "d_model": width,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": 0 if heads > 0 and head_dim * heads == width else head_dim,
        "layer_pattern": "A",
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": theta,
        "rope_scaling": factor,
        "qk_norm": False,
        "sliding_window": 0,
        "nope_layers": [],
        "ffn_type": "swiglu",
        "ffn_hidden": hf["intermediate_size"],
        "n_experts": 0,
        "strc_every": 0,
        "sla_conv_size": 0,
        "image_encoder": "none",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "init_std": hf.get("initializer_range", 0.02),
        "dropout": 0.0,
    }
    try:
        sizing.check_model_mapping(mapping, where=where)
        config = ModelConfig.from_dict(mapping)
        sizing.check_config(config, where=where)
    except ConfigError as exc:
        raise ImportError_(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc
    except (ArithmeticError, TypeError) as exc:
        raise ImportError_(f"{where}: these settings cannot build a model ({exc})") from exc
    return config


def _read_json(path: Path, limit: int) -> Any:
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except FileNotFoundError:
        raise ImportError_(
            f"{path.parent}: no {path.name}; a Llama-format folder needs config.json, model.safetensors "
            "(or sharded *.safetensors with model.safetensors.index.json) and tokenizer.json"
        ) from None
    except OSError as exc:
        raise ImportError_(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if len(raw) > limit:
        raise ImportError_(f"{path} is larger than {sizing.human_bytes(limit)}; it is damaged or not what it should be")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ImportError_(f"{path} is not valid JSON ({exc})") from exc


# ---- tokenizer -----------------------------------------------------------------------------------------
def _is_byte_level(data: dict[str, Any]) -> bool:
    decoder = data.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if isinstance(decoder, dict) else []
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)


def llama_tokenizer(text: str, model_vocab: int, where: str = "tokenizer.json") -> tuple[Tokenizer, int]:
    """(Apertis tokenizer, its vocabulary size) from a HF tokenizer.json: the Apertis special tokens it lacks
    are added after its tokens, and reserved tokens fill it up to the model's vocab_size if the model has
    more embedding rows than the tokenizer has tokens."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ImportError_(f"{where} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not _is_byte_level(data):
        raise ImportError_(
            f"{where}: not a byte-level BPE tokenizer (a SentencePiece-style one, as Llama 1/2 use?). Apertis "
            "reads byte-level BPE tokenizers (GPT-2, Llama 3 style) only; import a model that uses one"
        )
    try:
        backend = HFTokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ImportError_(f"{where}: not a valid tokenizer.json ({exc})") from exc
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > model_vocab:
        raise ImportError_(
            f"{where} has {size} tokens but the model's vocab_size is {model_vocab}; the files come from "
            "different models"
        )
    missing = [s for s in SPECIAL_TOKENS if backend.token_to_id(s) is None]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
    size = backend.get_vocab_size(with_added_tokens=True)
    if size < model_vocab:  # padded embedding rows: every id the model can emit needs a token
        backend.add_special_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(model_vocab - size)]
        )
    size = backend.get_vocab_size(with_added_tokens=True)
    try:
        tokenizer = Tokenizer(backend, where)
    except (ConfigError, KeyError) as exc:
        raise ImportError_(f"{where}: cannot be used as an Apertis tokenizer ({exc})") from exc
    if tokenizer.vocab_size != size or max(backend.get_vocab(with_added_tokens=True).values()) >= size:
        raise ImportError_(f"{where}: its token ids are not contiguous; the tokenizer is damaged")
    return tokenizer, size


# ---- weights --------------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        data = _read_json(index, _MAX_INDEX_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ImportError_(f"{index}: no weight_map of tensor names to files; the index is damaged")
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if PurePosixPath(n).name != n or not n.endswith(".safetensors")]
        if bad:
            raise ImportError_(f"{index}: names files outside the folder or not safetensors ({bad[0]!r})")
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ImportError_(f"{folder}: the index names {', '.join(absent[:3])}, which are missing")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = (
        f" (it has {', '.join(pickles[:3])}: pickled PyTorch weights, which are never loaded here; re-save the "
        "model with save_pretrained(..., safe_serialization=True))"
        if pickles
        else ""
    )
    raise ImportError_(f"{folder}: no model.safetensors or {INDEX_FILE}{hint}")


def _expected_shapes(cfg: ModelConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    d, dh, ff = cfg.d_model, cfg.dim_head(), cfg.dense_hidden()
    q, kv = cfg.n_heads * dh, cfg.kv_heads() * dh
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (q, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, q),
            f"{p}.mlp.gate_proj.weight": (ff, d),
            f"{p}.mlp.up_proj.weight": (ff, d),
            f"{p}.mlp.down_proj.weight": (d, ff),
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
        }
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def _check_weights(files: list[Path], cfg: ModelConfig, vocab: int) -> dict[str, Path]:
    """{tensor name: its file} once the headers hold exactly the tensors `cfg` needs, in a float type."""
    expected = _expected_shapes(cfg, vocab)
    where: dict[str, Path] = {}
    problems = []
    for path in files:
        for name, entry in _read_header(path).items():
            if name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved: recomputed here
                continue
            if name in where:
                problems.append(f"{name} is in two files")
            where[name] = path
            if name.endswith(".bias"):
                problems.append(f"{name}: a bias (Apertis' layers have none)")
            elif name == "lm_head.weight" and cfg.tie_embeddings:
                pass  # tied: the head is the embedding; a saved copy is ignored
            elif name not in expected:
                problems.append(f"unexpected tensor {name}")
            elif tuple(entry["shape"]) != expected[name]:
                problems.append(f"{name}: saved {tuple(entry['shape'])}, config needs {expected[name]}")
            elif entry["dtype"] not in ("F32", "F16", "BF16", "F64"):
                problems.append(f"{name}: stored as {entry['dtype']} (quantised?); only float weights import")
    problems += [f"missing {name}" for name in expected if name not in where]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ImportError_(f"the weights do not fit config.json as a plain Llama model: {shown}")
    return where


# ---- import -------------------------------------------------------------------------------------------
def import_llama(source: str | Path, out: str | Path, device: str = "cpu") -> Path:
    """Turn the Llama-format folder `source` into the Apertis bundle `out` (written atomically)."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        raise ImportError_(
            f"{folder}: not a folder; pass a Llama-format folder (config.json, *.safetensors, tokenizer.json)"
        )
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ImportError_(f"{out}: import into a new folder, not into the source")
    hf = _read_json(folder / "config.json", MAX_CONFIG_BYTES)
    llama_model_config(hf, where=str(folder / "config.json"))  # refuse non-Llama before the tokenizer
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ImportError_(f"{folder}: no tokenizer.json; save the tokenizer with the model (a fast tokenizer)")
    if tok_path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise ImportError_(f"{tok_path} is larger than {sizing.human_bytes(MAX_TOKENIZER_BYTES)}")
    model_vocab = hf["vocab_size"]
    tokenizer, vocab = llama_tokenizer(tok_path.read_text(encoding="utf-8"), model_vocab, str(tok_path))
    config = llama_model_config(hf, vocab_size=vocab, where=str(folder / "config.json"))
    try:
        sizing.check_loadable(config, device, where=str(folder / "config.json"))
    except sizing.ModelSizeError as exc:
        raise ImportError_(str(exc)) from exc
    files = _check_weights(_weight_files(folder), config, model_vocab)

    model = ApertisModel(config)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if files.get(name) == path:
                    tensors[name] = handle.get_tensor(name).to(torch.float32)
    with torch.no_grad():
        _fill(model, tensors, model_vocab)
    del tensors
    facts = {"imported from": f"Hugging Face Llama ({folder.name})"}
    return save_bundle(out, model, tokenizer, card=facts)


def _fill(model: ApertisModel, t: dict[str, torch.Tensor], model_vocab: int) -> None:
    """Copy HF Llama tensors into `model`: q/k/v stack into qkv, gate/up into gate_up (the layout the
    hf-llama export splits). Rows past the source's vocabulary (added special tokens) get the mean row."""

    def rows(weight: torch.Tensor, target: torch.Tensor) -> None:
        target[:model_vocab] = weight
        if target.shape[0] > model_vocab:
            target[model_vocab:] = weight.mean(dim=0, keepdim=True)

    rows(t["model.embed_tokens.weight"], model.embed.weight)
    if not model.config.tie_embeddings:
        rows(t["lm_head.weight"], model.lm_head.weight)
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}"
        block.mixer.qkv.weight.copy_(torch.cat([t[f"{p}.self_attn.{x}_proj.weight"] for x in ("q", "k", "v")], dim=0))
        block.mixer.out_proj.weight.copy_(t[f"{p}.self_attn.o_proj.weight"])
        block.ffn.gate_up.weight.copy_(torch.cat([t[f"{p}.mlp.gate_proj.weight"], t[f"{p}.mlp.up_proj.weight"]], dim=0))
        block.ffn.down.weight.copy_(t[f"{p}.mlp.down_proj.weight"])
        block.mixer_norm.weight.copy_(t[f"{p}.input_layernorm.weight"])
        block.ffn_norm.weight.copy_(t[f"{p}.post_attention_layernorm.weight"])
    model.norm.weight.copy_(t["model.norm.weight"])


# ---- zips (the studio's Models tab) ------------------------------------------------------------------
def _zip_json(zip_path: Path, info: zipfile.ZipInfo, limit: int) -> Any:
    if info.file_size > limit:
        raise ImportError_(f"{zip_path.name}: {info.filename} is {sizing.human_bytes(info.file_size)}; too large")
    try:
        with zipfile.ZipFile(zip_path) as archive, archive.open(info) as member:
            return json.loads(member.read(limit + 1).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise ImportError_(f"{zip_path.name}: {info.filename} cannot be read from the zip ({exc})") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ImportError_(f"{zip_path.name}: {info.filename} is not valid JSON ({exc})") from exc


def _zip_configs(members: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """config.json members at the top of the zip or in one folder (as a bundle zip's are looked for)."""
    return [
        m
        for m in members
        if not m.is_dir()
        and PurePosixPath(m.filename.replace("\\", "/")).name == "config.json"
        and len(PurePosixPath(m.filename.replace("\\", "/")).parent.parts) <= 1
        and not m.filename.startswith("__MACOSX")
    ]


def is_hf_zip(zip_path: str | Path) -> bool:
    """Whether a zip holds one Hugging Face model folder (its config.json has model_type/architectures)
    rather than an Apertis bundle. False for anything unreadable: the bundle import then says what is wrong."""
    zip_path = Path(zip_path)
    try:
        configs = _zip_configs(check_zip(zip_path, IMPORT_POLICY))
        return len(configs) == 1 and is_hf_config(_zip_json(zip_path, configs[0], MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return False


def import_llama_zip(zip_path: str | Path, dest: str | Path, work_dir: str | Path | None = None) -> list[str]:
    """Import a zip of a Llama-format folder into the new bundle folder `dest`; returns the zip's files that
    were left out. The zip keeps to the bundle archive policy; its config is mapped and the model sized
    before anything is extracted; only config.json, tokenizer.json, the index and *.safetensors are
    written (never pickles), to a work folder that is removed afterwards."""
    zip_path, dest = Path(zip_path), Path(dest)
    if dest.exists():
        raise FileExistsError(17, "the folder to import into already exists", str(dest))
    members = check_zip(zip_path, IMPORT_POLICY)
    configs = _zip_configs(members)
    if len(configs) != 1:
        raise ImportError_(f"{zip_path.name}: expected one model folder (one config.json), found {len(configs)}")
    folder = PurePosixPath(configs[0].filename.replace("\\", "/")).parent
    config = llama_model_config(
        _zip_json(zip_path, configs[0], MAX_CONFIG_BYTES), where=f"{zip_path.name}: config.json"
    )
    try:
        total = sizing.check_loadable(config, "cpu", where=f"{zip_path.name}: config.json")
    except sizing.ModelSizeError as exc:
        raise ImportError_(str(exc)) from exc
    weights = sum(
        m.file_size
        for m in members
        if m.filename.endswith(".safetensors") and PurePosixPath(m.filename).parent == folder
    )
    if weights > total * 8 + (1 << 24):
        raise ImportError_(
            f"{zip_path.name}: its safetensors files ({sizing.human_bytes(weights)}) are larger than the "
            f"{total:,} parameters config.json describes can take; the files do not belong together"
        )

    def keep(name: PurePosixPath) -> bool:
        return name.parent == folder and (name.name in _READ_FILES or name.suffix == ".safetensors")

    work_root = Path(work_dir) if work_dir is not None else dest.parent
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=work_root))
    try:
        unpacked = safe_extract(zip_path, work / "zip", IMPORT_POLICY, keep=keep) / folder
        import_llama(unpacked, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(
        m.filename
        for m in members
        if not m.is_dir()
        and not keep(PurePosixPath(m.filename.replace("\\", "/")))
        and not m.filename.startswith("__MACOSX")
    )
