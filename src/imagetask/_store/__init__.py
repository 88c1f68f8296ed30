"""The store: the only code that knows SQL. Its parts, one module each:

- ``schema``: tables and indexes as numbered migrations, and how they run;
- ``records``: what the store and the worker pass each other;
- ``transitions``: every write, a pure function run inside a transaction;
- ``reads``: every read statement;
- ``commit``: batching writes into transactions, answering callers, checkpoints;
- ``connections``: how each connection is opened and set up;
- ``rows``: rows into `Task` and `StoredImage` records, and a submit's record into its row;
- ``writer``: the write side, one object: both write connections, group commit, loop-thread
  commits, the checkpoint schedule;
- ``sqlite``: the SQLite store that composes them: its read connections, and every method of
  the contract handed to the writer or run as a read;
- ``contract``: `TaskStore`, every method the manager and the workers may call, and what each
  promises (the SQLite store implements it; a PostgreSQL store will).
"""

from .commit import is_damage as is_damage
from .commit import is_locked as is_locked
from .contract import TaskStore as TaskStore
from .reads import list_sql as list_sql
from .reads import pending_sql as pending_sql
from .records import WOULD_WAIT as WOULD_WAIT
from .records import Changes as Changes
from .records import Claimed as Claimed
from .records import SubmitRow as SubmitRow
from .records import Submitted as Submitted
from .schema import MIGRATIONS as MIGRATIONS
from .schema import SCHEMA_VERSION as SCHEMA_VERSION
from .sqlite import Store as Store

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "WOULD_WAIT",
    "Changes",
    "Claimed",
    "Store",
    "SubmitRow",
    "Submitted",
    "TaskStore",
    "is_damage",
    "is_locked",
    "list_sql",
    "pending_sql",
]
