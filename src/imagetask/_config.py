"""Defaults, paths and environment variables, in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

if TYPE_CHECKING:
    from .providers.base import Provider

#: Environment variable naming the data folder (database ``tasks.db`` and ``images/``).
HOME_ENV = "IMAGETASK_HOME"
#: Environment variables google-genai reads for the API key, in its order of precedence.
API_KEY_ENVS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")

DB_NAME = "tasks.db"
IMAGES_DIR = "images"

DEFAULT_CONCURRENCY = 4
DEFAULT_PER_OWNER = 4  # the seed's "up to 4 at once"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_ATTEMPT_TIMEOUT = 300.0
DEFAULT_LEASE = 60.0
DEFAULT_RETRY_DELAY = 2.0
#: Longest backoff between two attempts, whatever the attempt number.
RETRY_DELAY_CAP = 300.0
#: How often a process that does not do the work re-checks the database for changes.
DEFAULT_POLL_INTERVAL = 0.5
DEFAULT_OWNER = "default"

MAX_PROMPT_CHARS = 10_000
MAX_N = 8
MAX_KEY_CHARS = 200
MAX_REFERENCE_BYTES = 20 * 1024 * 1024
#: Largest image accepted (a reference, or a provider's answer), in pixels: checked from the
#: header before decoding, so a small file that decodes to gigabytes is refused cheaply.
MAX_IMAGE_PIXELS = 50_000_000
MAX_METADATA_BYTES = 64 * 1024
#: Deepest nesting of lists and objects allowed in metadata.
MAX_METADATA_DEPTH = 32
#: Largest credit grant, and largest balance, either way (well inside a 64-bit integer).
MAX_CREDITS = 10**12
#: Longest duration accepted anywhere (about 31 years): far past any real use, and safely
#: inside a 64-bit count of milliseconds.
MAX_SECONDS = 1e9
#: How long an attempt keeps trying to store its images when the image folder refuses them
#: (read-only, full, I/O error) before the task fails with ``storage_error``.
DEFAULT_STORAGE_TIMEOUT = 30.0
#: Files in the image folder whose task is unknown are swept only when older than this,
#: so prune never races a submit that is copying reference images.
ORPHAN_GRACE = 3600.0


def default_home() -> Path:
    """The default data folder: ``$IMAGETASK_HOME``, else the platform's user data folder
    (``~/.local/share/imagetask`` on Linux). It holds the database ``tasks.db`` and the
    image folder ``images/``."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("imagetask", appauthor=False))


def api_key_from_env() -> str | None:
    """The Gemini API key from the environment, with google-genai's precedence."""
    for name in API_KEY_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def default_provider(*, workers: bool = True) -> Provider | None:
    """Gemini when an API key is in the environment, else None (the caller must pass one).
    A manager without workers gets Gemini all the same: it only validates and prices against
    Gemini's model table, which needs no key (its tasks run in an `imagetask worker`)."""
    if api_key_from_env() is None and workers:
        return None
    from .providers.gemini import GeminiProvider

    return GeminiProvider()
