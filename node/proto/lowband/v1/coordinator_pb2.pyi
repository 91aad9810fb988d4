from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRunRequest(_message.Message):
    __slots__ = ("protocol_version", "read_token")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    READ_TOKEN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    read_token: str
    def __init__(self, protocol_version: _Optional[int] = ..., read_token: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run_id", "config_json", "config_hash", "task_fingerprint", "model_digest", "protocol_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    TASK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_json: str
    config_hash: str
    task_fingerprint: str
    model_digest: str
    protocol_version: int
    def __init__(self, run_id: _Optional[str] = ..., config_json: _Optional[str] = ..., config_hash: _Optional[str] = ..., task_fingerprint: _Optional[str] = ..., model_digest: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node_name", "protocol_version", "config_json", "config_hash", "task_fingerprint", "model_digest", "capabilities", "join_token", "public_key", "signature", "timestamp_ms")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    TASK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    protocol_version: int
    config_json: str
    config_hash: str
    task_fingerprint: str
    model_digest: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    join_token: str
    public_key: bytes
    signature: bytes
    timestamp_ms: int
    def __init__(self, node_name: _Optional[str] = ..., protocol_version: _Optional[int] = ..., config_json: _Optional[str] = ..., config_hash: _Optional[str] = ..., task_fingerprint: _Optional[str] = ..., model_digest: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., join_token: _Optional[str] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("node_id", "lease_ms", "heartbeat_interval_ms", "current_round", "first_round", "committed_rounds", "config_json", "shard", "num_shards", "replaced", "upload_go")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_GO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    lease_ms: int
    heartbeat_interval_ms: int
    current_round: int
    first_round: int
    committed_rounds: int
    config_json: str
    shard: int
    num_shards: int
    replaced: bool
    upload_go: bool
    def __init__(self, node_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., current_round: _Optional[int] = ..., first_round: _Optional[int] = ..., committed_rounds: _Optional[int] = ..., config_json: _Optional[str] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., replaced: _Optional[bool] = ..., upload_go: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("current_round", "committed_rounds", "lease_ms")
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    current_round: int
    committed_rounds: int
    lease_ms: int
    def __init__(self, current_round: _Optional[int] = ..., committed_rounds: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubmitChunk(_message.Message):
    __slots__ = ("node_id", "round", "offset", "total_size", "data", "train_loss")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    offset: int
    total_size: int
    data: bytes
    train_loss: float
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ..., train_loss: _Optional[float] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("round", "received_bytes", "accepted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    received_bytes: int
    accepted: bool
    def __init__(self, round: _Optional[int] = ..., received_bytes: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class CollectRequest(_message.Message):
    __slots__ = ("node_id", "round", "wait_ms", "submitted")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    wait_ms: int
    submitted: bool
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., wait_ms: _Optional[int] = ..., submitted: _Optional[bool] = ...) -> None: ...

class CollectHeader(_message.Message):
    __slots__ = ("round", "committed", "members", "payload_sizes", "reference_fingerprint", "reason", "aggregate_size", "aggregate_codec", "member_keys")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_CODEC_FIELD_NUMBER: _ClassVar[int]
    MEMBER_KEYS_FIELD_NUMBER: _ClassVar[int]
    round: int
    committed: bool
    members: _containers.RepeatedScalarFieldContainer[str]
    payload_sizes: _containers.RepeatedScalarFieldContainer[int]
    reference_fingerprint: str
    reason: str
    aggregate_size: int
    aggregate_codec: str
    member_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, round: _Optional[int] = ..., committed: _Optional[bool] = ..., members: _Optional[_Iterable[str]] = ..., payload_sizes: _Optional[_Iterable[int]] = ..., reference_fingerprint: _Optional[str] = ..., reason: _Optional[str] = ..., aggregate_size: _Optional[int] = ..., aggregate_codec: _Optional[str] = ..., member_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PayloadPiece(_message.Message):
    __slots__ = ("member", "offset", "data")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    member: int
    offset: int
    data: bytes
    def __init__(self, member: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class CollectChunk(_message.Message):
    __slots__ = ("header", "piece")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    header: CollectHeader
    piece: PayloadPiece
    def __init__(self, header: _Optional[_Union[CollectHeader, _Mapping]] = ..., piece: _Optional[_Union[PayloadPiece, _Mapping]] = ...) -> None: ...

class FetchStateRequest(_message.Message):
    __slots__ = ("node_id", "offset", "join_token", "min_committed_rounds")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIN_COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    offset: int
    join_token: str
    min_committed_rounds: int
    def __init__(self, node_id: _Optional[str] = ..., offset: _Optional[int] = ..., join_token: _Optional[str] = ..., min_committed_rounds: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("committed_rounds", "total_size", "offset", "data", "reference_fingerprint")
    COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    committed_rounds: int
    total_size: int
    offset: int
    data: bytes
    reference_fingerprint: str
    def __init__(self, committed_rounds: _Optional[int] = ..., total_size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., reference_fingerprint: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("read_token",)
    READ_TOKEN_FIELD_NUMBER: _ClassVar[int]
    read_token: str
    def __init__(self, read_token: _Optional[str] = ...) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("node_id", "name", "last_heartbeat_age_s", "rounds_contributed", "first_round", "bytes_in", "bytes_out", "last_loss", "capabilities", "key_id", "frames_seen", "frames_clipped", "frames_rejected", "norm_ratio", "cosine")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_CONTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SEEN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_CLIPPED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    NORM_RATIO_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    last_heartbeat_age_s: float
    rounds_contributed: int
    first_round: int
    bytes_in: int
    bytes_out: int
    last_loss: float
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    key_id: str
    frames_seen: int
    frames_clipped: int
    frames_rejected: int
    norm_ratio: float
    cosine: float
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., last_heartbeat_age_s: _Optional[float] = ..., rounds_contributed: _Optional[int] = ..., first_round: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., last_loss: _Optional[float] = ..., capabilities: _Optional[_Iterable[str]] = ..., key_id: _Optional[str] = ..., frames_seen: _Optional[int] = ..., frames_clipped: _Optional[int] = ..., frames_rejected: _Optional[int] = ..., norm_ratio: _Optional[float] = ..., cosine: _Optional[float] = ...) -> None: ...

class EvictedMember(_message.Message):
    __slots__ = ("name", "round", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    round: int
    reason: str
    def __init__(self, name: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "members", "bytes_in", "bytes_out", "duration_s", "mean_loss", "reason", "val_loss", "reference_fingerprint")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    round: int
    members: _containers.RepeatedScalarFieldContainer[str]
    bytes_in: int
    bytes_out: int
    duration_s: float
    mean_loss: float
    reason: str
    val_loss: float
    reference_fingerprint: str
    def __init__(self, round: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., duration_s: _Optional[float] = ..., mean_loss: _Optional[float] = ..., reason: _Optional[str] = ..., val_loss: _Optional[float] = ..., reference_fingerprint: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("run_id", "recipe", "current_round", "committed_rounds", "deadline_in_s", "members", "recent_rounds", "reference_fingerprint", "submitted", "persistence_error", "evicted", "total_rounds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_IN_S_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_ERROR_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    recipe: str
    current_round: int
    committed_rounds: int
    deadline_in_s: float
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    recent_rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    reference_fingerprint: str
    submitted: _containers.RepeatedScalarFieldContainer[str]
    persistence_error: str
    evicted: _containers.RepeatedCompositeFieldContainer[EvictedMember]
    total_rounds: int
    def __init__(self, run_id: _Optional[str] = ..., recipe: _Optional[str] = ..., current_round: _Optional[int] = ..., committed_rounds: _Optional[int] = ..., deadline_in_s: _Optional[float] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., recent_rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., reference_fingerprint: _Optional[str] = ..., submitted: _Optional[_Iterable[str]] = ..., persistence_error: _Optional[str] = ..., evicted: _Optional[_Iterable[_Union[EvictedMember, _Mapping]]] = ..., total_rounds: _Optional[int] = ...) -> None: ...
