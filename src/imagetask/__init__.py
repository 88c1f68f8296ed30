"""imagetask: durable background tasks for slow image generation, backed by SQLite.

async with TaskManager(provider=FakeProvider()) as tm:
    task = await tm.submit("a lighthouse at dusk", n=2)
    task = await tm.wait(task.id)

with SyncTaskManager(provider=FakeProvider()) as tm:   # the same, blocking
    task = tm.wait(tm.submit("a lighthouse at dusk").id)
"""

from ._config import default_home as default_home
from ._exceptions import ConfigError as ConfigError
from ._exceptions import ImageTaskError as ImageTaskError
from ._exceptions import InsufficientCredits as InsufficientCredits
from ._exceptions import ProviderError as ProviderError
from ._exceptions import StoreError as StoreError
from ._exceptions import TaskNotFound as TaskNotFound
from ._exceptions import TooManyPending as TooManyPending
from ._exceptions import ValidationError as ValidationError
from ._exceptions import WaitTimeout as WaitTimeout
from ._feed import Feed as Feed
from ._manager import TaskManager as TaskManager
from ._models import GenerationRequest as GenerationRequest
from ._models import StoredImage as StoredImage
from ._models import Task as Task
from ._models import TaskError as TaskError
from ._models import TaskEvent as TaskEvent
from ._models import TaskStatus as TaskStatus
from ._records import Credits as Credits
from ._records import Health as Health
from ._records import PruneReport as PruneReport
from ._remote import RemoteCredits as RemoteCredits
from ._remote import RemoteTaskManager as RemoteTaskManager
from ._sync import SyncCredits as SyncCredits
from ._sync import SyncRemoteTaskManager as SyncRemoteTaskManager
from ._sync import SyncTaskManager as SyncTaskManager
from ._tokens import TokenInfo as TokenInfo
from ._tokens import Tokens as Tokens

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Credits",
    "Feed",
    "GenerationRequest",
    "Health",
    "ImageTaskError",
    "InsufficientCredits",
    "ProviderError",
    "PruneReport",
    "RemoteCredits",
    "RemoteTaskManager",
    "StoreError",
    "SyncCredits",
    "SyncRemoteTaskManager",
    "SyncTaskManager",
    "Task",
    "TaskError",
    "TaskEvent",
    "TaskManager",
    "TaskNotFound",
    "TaskStatus",
    "TokenInfo",
    "Tokens",
    "TooManyPending",
    "ValidationError",
    "WaitTimeout",
    "__version__",
    "default_home",
]

Credits.__module__ = "imagetask"
GenerationRequest.__module__ = "imagetask"
