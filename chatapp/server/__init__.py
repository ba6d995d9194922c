"""`smollchat serve`: an OpenAI-compatible HTTP server on the chat session and the engine contract.

Built on Starlette + uvicorn rather than FastAPI: the server has four routes whose bodies are checked
by hand anyway (OpenAI's error shape and parameter names, then the contract's own validators, the ones
the CLI uses), so FastAPI's pydantic models would be a second validator with its own 422 errors to
translate back; Starlette alone is the same ASGI stack with fewer dependencies. SSE is a plain
StreamingResponse, whose cancellation on client disconnect stops the engine (app.py). Models come from
the app's one model pool (chat/pool.py: lazy loads within a memory budget, a fair queue per model).

    schema.py      request bodies -> checked requests; OpenAI's error shape
    generation.py  one request: checked against the model, run through the Session / engine, to JSON/SSE
    record.py      --record: served chats into the chat store, continuing the chat a history extends
    app.py         routes, the API key / Host guard, CORS, the worker -> response bridge
"""
from .app import create_app
from ..chat.pool import ModelPool

__all__ = ["create_app", "ModelPool"]
