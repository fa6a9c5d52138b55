"""Serving: one LLM interface (`llm.py`: in-process sampler or OpenAI-compatible endpoint) and an
OpenAI-compatible server over exrl's sampler (`app.py`; run it with `python -m exrl.serve --model DIR`)."""
