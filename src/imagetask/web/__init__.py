"""The web door (extra ``imagetask[web]``): an ASGI app serving a `TaskManager` over HTTP.

    from imagetask import TaskManager
    from imagetask.web import create_app

    app = create_app(TaskManager("tasks.db"))      # uvicorn module:app, or mount it

It serves a JSON API under ``/api`` (submit, poll, list, cancel, events, images and
thumbnails, credits), the seed web app's three endpoints with their own field names, a
Server-Sent Events stream of the caller's task changes, ``/openapi.json``, and a page at
``/``. Every request acts as one owner: a bearer token (``imagetask token create OWNER``) or
your app's own ``auth(request)``; another owner's task is a 404 on every route.
"""

from ._app import create_app as create_app

__all__ = ["create_app"]
