"""Export any Apertis model as a Hugging Face transformers folder loaded with `trust_remote_code=True`.

`export_hf(model, tokenizer, out)` writes:

- `config.json`: model_type "apertis", `auto_map` to the two code files below, and the whole Apertis
  `ModelConfig` under the key "apertis";
- `configuration_apertis.py` / `modeling_apertis.py`: `ApertisConfig` (a `PretrainedConfig`) and
  `ApertisForCausalLM` (a `PreTrainedModel` + `GenerationMixin`) that wraps `apertis_core.ApertisModel`;
- `model.safetensors`: the Apertis weights under `model.<our name>` (fp32, the tied LM head stored once);
- `tokenizer.json` + `tokenizer_config.json` (PreTrainedTokenizerFast, with the chat template),
  `generation_config.json` and a README.

Why the modeling file imports `apertis_core` instead of carrying a copy of it: the architecture (SLA,
STRC, experts, the image encoders) is a few thousand lines in many modules; a vendored copy would drift
from the code that trained the model, while the import is exactly the forward the studio runs. Everything
works offline: the code files are in the folder and `apertis_core` comes from the installed
apertis-studio package (`pip install apertis-studio[hf]`), nothing is fetched. A folder for plain
transformers without apertis_core is what `--format hf-llama` writes, for transformer-* presets.

The code files are kept here as strings (not as package files) so that a frozen (PyInstaller) build,
which has no .py sources on disk, still writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .bundle import atomic_directory, unwrap_model
from .fileio import atomic_write_text
from .model import ApertisModel

CONFIGURATION_FILE = "configuration_apertis.py"
MODELING_FILE = "modeling_apertis.py"

CONFIGURATION_SOURCE = '''"""ApertisConfig: the Apertis ModelConfig (under "apertis") as a transformers PretrainedConfig.

Written by `apertis export --format hf` (Apertis Studio).
"""

from transformers import PretrainedConfig


class ApertisConfig(PretrainedConfig):
    model_type = "apertis"

    def __init__(self, apertis=None, tie_word_embeddings=True, **kwargs):
        self.apertis = dict(apertis or {})
        # the usual names, for tools that read them; the model itself is built from `apertis`
        for ours, theirs in (("vocab_size", "vocab_size"), ("d_model", "hidden_size"),
                             ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
                             ("max_seq_len", "max_position_embeddings")):
            if ours in self.apertis:
                kwargs.setdefault(theirs, self.apertis[ours])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_SOURCE = '''"""ApertisForCausalLM: an Apertis Studio model as a transformers PreTrainedModel.

Written by `apertis export --format hf`. The network is `apertis_core.ApertisModel`, imported from the
installed apertis-studio package (`pip install "apertis-studio[hf]"`); nothing is downloaded.

Generation: `generate` works (greedy, sampling, beam search...). Each step recomputes the whole
sequence (no key/value cache: Apertis layers keep recurrent states that transformers' caches do not
model), which is exact but costs O(length) per token; for fast local generation use `apertis generate`.

Padding: Apertis layers (linear attention, STRC) have no attention mask, so left-padded batches are
refused; right padding is fine for scoring (positions after the padding are not used).

Images (models with an image encoder): pass `images=[tensor (3, H, W), ...]` preprocessed with
`apertis_core.vision.preprocess.preprocess_image(path, config.apertis["image_patch_size"],
config.apertis["image_max_patches"])`, and input_ids in which each `<image>` id is widened to its patch
count with `model.model.expand_image_tokens(ids, images)`. `generate(input_ids, images=images)` passes
them on at every step.
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_apertis import ApertisConfig

try:
    from apertis_core.model import ApertisModel, ModelConfig
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "This model folder was exported by Apertis Studio and runs on its apertis_core package: "
        "install it where you load the folder (pip install \\"apertis-studio[hf]\\")"
    ) from exc


class ApertisForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ApertisConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = False
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = ApertisModel(ModelConfig.from_dict(config.apertis))
        self.post_init()

    def _init_weights(self, module):
        pass  # ApertisModel initialises itself; from_pretrained loads every weight

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, images=None, labels=None, past_key_values=None,
                use_cache=None, return_dict=None, logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError("ApertisForCausalLM needs input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()):
            raise ValueError(
                "left padding is not supported: Apertis layers have no attention mask; "
                "generate one prompt at a time, or batch prompts of equal length"
            )
        logits = self.model(input_ids, images=images).logits
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, images=None, **kwargs):
        # the whole sequence every step: exact, and images stay aligned with their <image> positions
        return {"input_ids": input_ids, "attention_mask": attention_mask, "images": images}

    def _supports_default_dynamic_cache(self):
        return False

'''


def hf_config(model: ApertisModel, tokenizer: Any) -> dict[str, Any]:
    """config.json for the wrapper: transformers' fields plus our whole ModelConfig under "apertis"."""
    cfg = model.config
    try:  # writing the folder needs no transformers; loading it does
        from transformers import __version__ as transformers_version
    except ImportError:
        transformers_version = None
    return {
        "architectures": ["ApertisForCausalLM"],
        "model_type": "apertis",
        "auto_map": {
            "AutoConfig": "configuration_apertis.ApertisConfig",
            "AutoModelForCausalLM": "modeling_apertis.ApertisForCausalLM",
        },
        "apertis": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tokenizer.eot_id,  # documents are separated (and so preceded) by end-of-text
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
        "use_cache": False,
        "dtype": "float32",
        **({"transformers_version": transformers_version} if transformers_version else {}),
    }


def hf_state_dict(model: ApertisModel) -> dict[str, torch.Tensor]:
    """Our weights as `model.<name>` fp32 tensors; a tied LM head is stored once (as model.embed.weight)."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        tensors[f"model.{name}"] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    return tensors


# Our chat format (Tokenizer.encode_chat) in Jinja; the same as export.chat_template(), which this module
# cannot import (export imports this module). tests/test_export_hf.py checks both against encode_chat.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer_config(tokenizer: Any, max_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|eot|>",
        "pad_token": "<|pad|>",
        "additional_special_tokens": ["<image>", "<|system|>", "<|user|>", "<|assistant|>"],
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def export_hf(model: ApertisModel, tokenizer: Any, out: str | Path) -> Path:
    """Write a folder `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` and
    `AutoTokenizer.from_pretrained(out)` load; any preset, image encoders included."""
    from safetensors.torch import save_file

    model = unwrap_model(model)
    cfg = model.config
    with atomic_directory(out) as tmp:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(hf_config(model, tokenizer), indent=2) + "\n")
        atomic_write_text(tmp / CONFIGURATION_FILE, CONFIGURATION_SOURCE)
        atomic_write_text(tmp / MODELING_FILE, MODELING_SOURCE)
        tokenizer.save(tmp / "tokenizer.json")
        atomic_write_text(
            tmp / "tokenizer_config.json", json.dumps(tokenizer_config(tokenizer, cfg.max_seq_len), indent=2) + "\n"
        )
        generation = {
            "bos_token_id": tokenizer.eot_id,
            "eos_token_id": tokenizer.eot_id,
            "pad_token_id": tokenizer.pad_id,
            "use_cache": False,
        }
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", _card(model, Path(out).name))
    return Path(out)


def _card(model: ApertisModel, name: str) -> str:
    cfg = model.config
    images = f" It reads images ({cfg.image_encoder} encoder)." if cfg.image_encoder != "none" else ""
    return (
        f"# {name}\n\nAn Apertis Studio language model (preset {cfg.preset}, {model.num_parameters():,} parameters, "
        f"{cfg.n_layers} layers x {cfg.d_model}, vocabulary {cfg.vocab_size}).{images}\n\n"
        "## Loading with Hugging Face transformers\n\n"
        "This folder carries its model code (`modeling_apertis.py`), which runs on the `apertis_core` package: "
        'install it first (`pip install "apertis-studio[hf]"`); nothing is downloaded.\n\n'
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # no question about the code\n"
        'ids = tokenizer("To be, or not", return_tensors="pt").input_ids\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))\n```\n\n"
        "Generation recomputes the whole sequence at each token (no cache): exact but slower than "
        "`apertis generate`. The chat template is in tokenizer_config.json.\n"
    )
