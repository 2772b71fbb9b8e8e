"""Every message the roles exchange (pure Python; tensor fields are opaque payloads).

Roles: the router (front end), N instances, one gManager. Any role may send to any other at any
time through `infinite_llm.transport`; per ordered pair messages arrive in order, and the
protocols below rely on exactly that:

- router -> home: `AddRequest`, `AbortRequest`; home -> router: `RequestUpdate` (token deltas).
- rManager to rManager: `BorrowRequest` -> `BorrowReply` (grant or refusal), `ReleaseBlocks`,
  `AttachBlock` (a migrated block takes its place in a request's table on its holder).
- attention service: home -> holder `AttnQuery` (queries and the new tokens' K/V whose slots are
  on the holder; the holder finds the request's blocks in its own ledger, so the message is O(1)
  in the context length), holder -> home `AttnPartial` (out, lse).
- instance -> gManager: `Heartbeat` (on a period, from a thread compute cannot block),
  `CreditorQuery` -> `CreditorReply`; gManager -> home: `MigrationOrder`.
- migration data: home -> source holder `CopyBlock`, source -> target `BlockData`,
  target -> home `CopyDone`.
- membership: a crashing instance (or the launcher that saw its process die) -> gManager
  `InstanceFailed`; operator -> gManager `RemoveInstance`; gManager -> every instance and the
  router `InstanceDown` once it declares an instance dead or removed. The launcher -> gManager
  `InstanceJoined` for a new instance, which the gManager passes on to everyone (and tells the
  newcomer, with `InstanceDown`s, who is already dead). Instance ids are never reused, so an id is also the generation that fences a
  dead instance's late messages (`sender_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from infinite_llm.control.request import Request

ROUTER = "router"
GMANAGER = "gmanager"


# ------------------------------------------------------------------ router <-> home
@dataclass
class AddRequest:
    request: Request
    # Re-dispatched after its home died: admitted past the waiting-queue limit (it was admitted
    # once already, and a full queue must not lose it).
    resumed: bool = False


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class RequestUpdate:
    """What a home reports about one of its requests after a step (a delta, not the whole)."""

    instance: int
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    error: Optional[str] = None  # set when the request failed on the instance (it alone)


# ------------------------------------------------------------------ rManager <-> rManager
@dataclass
class BorrowRequest:
    """Ask a creditor for blocks for `request_id` homed on `borrower`.

    `indices` are the positions the blocks take in the request's block table (so the creditor
    can serve attention over them without being sent the table); None asks for a migration
    reservation, placed later by `AttachBlock`.
    """

    tag: int
    borrower: int
    request_id: str
    num_blocks: int
    indices: Optional[list[int]] = None
    copy_tags: Optional[list[int]] = None  # for a reservation: the copies that will fill it
    # The request is larger than one instance: its blocks here go back (`ReclaimBlocks`) when
    # a request that fits one instance waits for them on the creditor.
    yields: bool = False


@dataclass
class BorrowReply:
    tag: int
    creditor: int
    request_id: str
    blocks: Optional[list[int]]  # None: refused


@dataclass
class ReleaseBlocks:
    """The borrower gives back blocks (None: every block held for the request)."""

    borrower: int
    request_id: str
    blocks: Optional[list[int]] = None


@dataclass
class ReclaimBlocks:
    """Creditor -> home: a request homed on the creditor waits for memory it lent to this
    request; give it back (the home recomputes the request later)."""

    creditor: int
    request_id: str


@dataclass
class AdmissionHold:
    """Home -> every peer: its request larger than one instance has waited while many others
    were admitted past it (`on`): admit nothing new until it starts (`on` False), so that the
    memory it needs frees up. Bounds how long such a request can wait."""

    home: int
    request_id: str
    on: bool


@dataclass
class AttachBlock:
    """A reserved block now holds table position `index` of the request (migration commit)."""

    borrower: int
    request_id: str
    index: int
    block: int


# ------------------------------------------------------------------ attention service
@dataclass
class GuestSeq:
    """One request's share of an `AttnQuery`: `num_queries` query rows at positions
    start_pos.., attending to the holder's blocks of the request up to `end_pos` tokens;
    `write_offsets` are the chunk offsets of new tokens whose K/V slots are on the holder."""

    request_id: str
    start_pos: int
    num_queries: int
    write_offsets: list[int] = field(default_factory=list)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_queries


@dataclass
class AttnQuery:
    home: int
    step: int
    layer: int
    seqs: list[GuestSeq]
    q: Any  # [sum num_queries, Hq, D]
    k: Any  # [sum len(write_offsets), Hkv, D]
    v: Any


@dataclass
class AttnPartial:
    holder: int
    step: int
    layer: int
    out: Any  # [sum num_queries, Hq, D] float32
    lse: Any  # [sum num_queries, Hq] float32
    error: Optional[str] = None


# ------------------------------------------------------------------ gManager
@dataclass
class RequestPlacement:
    """Where a running request's KV lives, as its home reports it to the gManager."""

    request_id: str
    home: int
    tokens_by_instance: dict[int, int]
    movable_blocks: dict[int, int]  # full (immutable) blocks per instance


@dataclass
class InstanceLoad:
    """The load figures of a heartbeat."""

    batch_size: int = 0
    num_waiting: int = 0
    num_waiting_for_memory: int = 0
    waiting_tokens: int = 0
    running_tokens: int = 0
    # Tokens of prompt (or recompute) chunks still to run: each request's tokens not computed
    # yet, less the one it decodes next.
    prefill_backlog_tokens: int = 0
    num_received: int = 0  # requests handed to the instance, ever (taken in or refused)
    # Cumulative counters of the instance (for stats and benchmarks).
    num_steps: int = 0
    num_preemptions: int = 0
    num_migrated_blocks: int = 0
    num_guest_queries: int = 0
    num_recomputed: int = 0  # requests recomputed here because a peer holding their KV died


@dataclass
class InstanceStatus:
    """One instance's block counts and load, as its latest heartbeat reported them, and its
    liveness as the gManager judges it ("alive", "suspect": heartbeats late, "dead")."""

    instance: int
    num_blocks: int
    num_free: int
    num_lent: int
    num_borrowed: int
    lendable: int
    load: InstanceLoad
    state: str = "alive"
    heartbeat_age_s: float = 0.0


@dataclass
class Heartbeat:
    instance: int
    seq: int  # increases by one per heartbeat of this instance
    sent_time: float
    num_blocks: int
    num_free: int
    num_lent: int
    num_borrowed: int
    lendable: int
    load: InstanceLoad
    # Placement changes since the previous heartbeat (changed or new requests, and gone ones).
    placements: list[RequestPlacement] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # Seconds since the step loop last went round: a loop hung in a kernel or a deadlock shows
    # here even though this thread still beats.
    loop_age_s: float = 0.0
    host: str = ""  # the machine the instance runs on (block copies between hosts cost more)

    def status(self, state: str = "alive", heartbeat_age_s: float = 0.0) -> InstanceStatus:
        return InstanceStatus(self.instance, self.num_blocks, self.num_free, self.num_lent, self.num_borrowed,
                              self.lendable, self.load, state, heartbeat_age_s)


@dataclass
class ClusterView:
    """gManager -> router, on the heartbeat period: what it knows of every instance."""

    statuses: dict[int, InstanceStatus]


@dataclass
class CreditorQuery:
    tag: int
    instance: int
    num_blocks: int


@dataclass
class CreditorReply:
    tag: int
    candidates: list[int]


@dataclass
class MigrationOrder:
    """Move `num_blocks` full blocks of the request from instance `src` to `dst`."""

    request_id: str
    src: int
    dst: int
    num_blocks: int


# ------------------------------------------------------------------ migration data
@dataclass
class CopyBlock:
    """Home -> source holder: send the payload of `src_block` to `dst`'s `dst_block`."""

    tag: int
    home: int
    request_id: str
    src_block: int
    dst: int
    dst_block: int


@dataclass
class BlockData:
    tag: int
    src: int
    home: int
    request_id: str
    dst_block: int
    payload: Any  # all layers' K and V of one block, flattened


@dataclass
class CopyDone:
    tag: int
    holder: int  # the copy's target
    request_id: str
    ok: bool = True


# ------------------------------------------------------------------ membership
@dataclass
class InstanceFailed:
    """Someone saw `instance` fail (its own loop crashed, or its process died)."""

    instance: int
    reason: str


@dataclass
class InstanceJoined:
    """The launcher -> gManager -> all: a new instance (a new id) is part of the cluster. The
    launcher has already told every peer its address."""

    instance: int


@dataclass
class RemoveInstance:
    """Operator -> gManager: take `instance` out of the cluster. It is announced down like a
    dead one (its requests are recomputed elsewhere) and stops itself on hearing it."""

    instance: int
    reason: str = "removed by the operator"


@dataclass
class InstanceDown:
    """gManager -> all: `instance` is dead from now on; drop its messages, free what was lent to
    it, recompute the requests whose KV it held. Sent to the dead instance too: if it was only
    wedged and resumes, that is how it learns to stop."""

    instance: int
    reason: str


@dataclass
class Stop:
    """Ask a role's loops to exit."""


_SENDER_FIELD = {
    BorrowRequest: "borrower", BorrowReply: "creditor", ReleaseBlocks: "borrower", AttachBlock: "borrower",
    ReclaimBlocks: "creditor", AdmissionHold: "home",
    AttnQuery: "home", AttnPartial: "holder", CopyBlock: "home", BlockData: "src", CopyDone: "holder",
    Heartbeat: "instance", CreditorQuery: "instance", RequestUpdate: "instance",
}


def sender_of(message: object) -> Optional[int]:
    """The instance that sent `message` (None: the router, the gManager, or not instance-sent)."""
    if isinstance(message, list):  # a batch of RequestUpdates
        return message[0].instance if message else None
    name = _SENDER_FIELD.get(type(message))
    return getattr(message, name) if name else None
