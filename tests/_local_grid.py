"""A grid that delivers the server's messages to fedq's real ClientApp in this process.

One persistent Flower ``Context`` per device (SecAgg+ keeps its protocol state there, as a
SuperNode does between the messages of a run), every reply recorded as the server receives
it, and devices that go offline from a given protocol stage on (they answer nothing
more, as a device that lost power would), so a whole secure round runs without
SuperLink, SuperNodes or Ray in a fraction of a second of protocol overhead.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

FIRST_NODE = 100


def stage_of(msg: Message) -> str:
    """The SecAgg+ stage a server message belongs to ("" if none)."""
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return ""
    return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))


class LocalGrid(Grid):
    """``devices`` simulated devices (partition p is node ``FIRST_NODE + p``)."""

    def __init__(self, app: Callable[[Message, Context], Message], run_config: dict,
                 devices: int, offline_from: dict[int, str] | None = None) -> None:
        self._app = app
        self.contexts = {FIRST_NODE + p: Context(
            run_id=1, node_id=FIRST_NODE + p, state=RecordDict(), run_config=run_config,
            node_config={"partition-id": p, "num-partitions": devices})
            for p in range(devices)}
        self.offline_from = offline_from or {}  # node -> first stage it does not answer
        self.offline: set[int] = set()
        self.received: list[Message] = []  # every reply, as the server got it

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Deliver each message and collect the replies of the devices still online."""
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_created_at"] = time.time()
            node = msg.metadata.dst_node_id
            if self.offline_from.get(node) == stage_of(msg):
                self.offline.add(node)
            if node in self.offline:
                continue
            try:  # a copy, as the device gets it over the wire (messages share content)
                reply = self._app(copy.deepcopy(msg), self.contexts[node])
            except Exception as err:  # a SuperNode reports it as an error
                reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node  # a SuperNode sends as itself
            replies.append(reply)
        self.received += replies
        return replies
