"""``draftwise serve``: an OpenAI-compatible server with continuous batching (see
:mod:`draftwise.serve.app` and :mod:`draftwise.serve.scheduler`)."""
