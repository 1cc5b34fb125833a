"""A tiny random-initialised image-text-to-text model, written to a folder, for tests and smoke runs.

It is a real Hugging Face Llava (CLIP vision tower + Qwen2 language model, a few hundred kilobytes)
with a byte-level BPE tokenizer trained here on the planning prompt's own words, so the `hf`
planner and the `mllm` encoder can run end to end with no download: `HFPlanner(write_tiny_mllm(d))`.
It writes garbage, which exercises the re-prompt and fallback path.

Llava rather than Qwen2-VL: Qwen2-VL's processor requires torchvision (for its video processor),
which this project does not install; both load through the same Auto* classes.
"""

from __future__ import annotations

import os

from fape_jax.planning import prompts
from fape_jax.planning.hints import Hints
from fape_jax.tasks import TASKS

IMAGE_TOKEN = "<image>"
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)
# A ChatML template (the Qwen family's) that understands {"type": "image"} content parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_TOKEN +
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus() -> list[str]:
  h = Hints(height=100, width=100, rain_line=0.1, rain_anisotropy=0.8, rain_fft_ratio=0.1,
            snow_blobs=1, snow_blob_density=0.1, noise_mad=0.001, noise_chroma=0.001,
            noise_score=0.4, blur_laplacian_var=0.01, blur_fft_ratio=0.01, blur_grad95=0.2,
            haze_dark=0.2, haze_saturation=0.3, haze_depth=0.01, haze_score=0.4, luma_mean=0.5,
            luma_median=0.5)
  return [prompts.build_prompt(h), prompts.FORMAT_LINE, *TASKS, "Restore this image according to"]


def write_tiny_mllm(folder: str | os.PathLike, *, seed: int = 0, hidden: int = 32) -> str:
  """Writes model + processor (tokenizer, image processor, chat template) to `folder`."""
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=600, special_tokens=list(SPECIAL), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  vocab = tokenizer.get_vocab()
  image_processor = transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
  processor = transformers.LlavaProcessor(
      image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
      vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
      image_token=IMAGE_TOKEN, num_additional_image_tokens=1)   # +1: CLIP's class token
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
          num_attention_heads=4, image_size=28, patch_size=14, projection_dim=hidden),
      text_config=transformers.Qwen2Config(
          vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=8192),
      image_token_id=vocab[IMAGE_TOKEN], vision_feature_select_strategy="full",
      vision_feature_layer=-1)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  model.generation_config.eos_token_id = vocab["<|im_end|>"]
  model.generation_config.pad_token_id = vocab["<|endoftext|>"]
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder)
  processor.save_pretrained(folder)
  return str(folder)
