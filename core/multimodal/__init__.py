"""Images in prompts: loading (media.py), preprocessing with the model's HF image processor
(processor.py), the inputs that travel with a request (inputs.py), the encoder cache's accounts
(encoder_cache.py) and Qwen2-VL's multimodal rotary positions (mrope.py). docs/multimodal.md."""
