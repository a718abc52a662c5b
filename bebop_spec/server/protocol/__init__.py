"""Pydantic request/response models: OpenAI (`openai.py`) and SGLang-native (`sglang.py`)."""
