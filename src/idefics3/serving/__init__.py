"""The OpenAI-compatible HTTP server (`idefics3 serve`): protocol, media, grammar, engine thread, app."""
