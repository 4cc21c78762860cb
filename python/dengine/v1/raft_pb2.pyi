from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_TYPE_UNSPECIFIED: _ClassVar[MessageType]
    APPEND: _ClassVar[MessageType]
    APPEND_RESPONSE: _ClassVar[MessageType]
    VOTE: _ClassVar[MessageType]
    VOTE_RESPONSE: _ClassVar[MessageType]
    PRE_VOTE: _ClassVar[MessageType]
    PRE_VOTE_RESPONSE: _ClassVar[MessageType]
    HEARTBEAT: _ClassVar[MessageType]
    HEARTBEAT_RESPONSE: _ClassVar[MessageType]
    PROPOSE: _ClassVar[MessageType]
    READ_INDEX: _ClassVar[MessageType]
    READ_INDEX_RESPONSE: _ClassVar[MessageType]
    TIMEOUT_NOW: _ClassVar[MessageType]
MESSAGE_TYPE_UNSPECIFIED: MessageType
APPEND: MessageType
APPEND_RESPONSE: MessageType
VOTE: MessageType
VOTE_RESPONSE: MessageType
PRE_VOTE: MessageType
PRE_VOTE_RESPONSE: MessageType
HEARTBEAT: MessageType
HEARTBEAT_RESPONSE: MessageType
PROPOSE: MessageType
READ_INDEX: MessageType
READ_INDEX_RESPONSE: MessageType
TIMEOUT_NOW: MessageType

class SnapshotHeader(_message.Message):
    __slots__ = ("cluster_id", "to", "term", "index", "log_term", "size", "sha256", "conf_index", "conf_term")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CONF_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONF_TERM_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    to: int
    term: int
    index: int
    log_term: int
    size: int
    sha256: bytes
    conf_index: int
    conf_term: int
    def __init__(self, cluster_id: _Optional[str] = ..., to: _Optional[int] = ..., term: _Optional[int] = ..., index: _Optional[int] = ..., log_term: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., conf_index: _Optional[int] = ..., conf_term: _Optional[int] = ..., **kwargs) -> None: ...

class SnapshotOfferResponse(_message.Message):
    __slots__ = ("term", "needed", "next_offset")
    TERM_FIELD_NUMBER: _ClassVar[int]
    NEEDED_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    term: int
    needed: bool
    next_offset: int
    def __init__(self, term: _Optional[int] = ..., needed: _Optional[bool] = ..., next_offset: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("header", "offset", "data", "crc32c")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    header: SnapshotHeader
    offset: int
    data: bytes
    crc32c: int
    def __init__(self, header: _Optional[_Union[SnapshotHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class InstallSnapshotResponse(_message.Message):
    __slots__ = ("term", "installed")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    term: int
    installed: bool
    def __init__(self, term: _Optional[int] = ..., installed: _Optional[bool] = ...) -> None: ...

class RaftMessage(_message.Message):
    __slots__ = ("cluster_id", "type", "to", "term", "index", "log_term", "commit", "reject", "reject_hint", "context", "entries", "payloads", "conf_index", "conf_term", "from_address")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    REJECT_HINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    CONF_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONF_TERM_FIELD_NUMBER: _ClassVar[int]
    FROM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    type: MessageType
    to: int
    term: int
    index: int
    log_term: int
    commit: int
    reject: bool
    reject_hint: int
    context: int
    entries: bytes
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    conf_index: int
    conf_term: int
    from_address: str
    def __init__(self, cluster_id: _Optional[str] = ..., type: _Optional[_Union[MessageType, str]] = ..., to: _Optional[int] = ..., term: _Optional[int] = ..., index: _Optional[int] = ..., log_term: _Optional[int] = ..., commit: _Optional[int] = ..., reject: _Optional[bool] = ..., reject_hint: _Optional[int] = ..., context: _Optional[int] = ..., entries: _Optional[bytes] = ..., payloads: _Optional[_Iterable[bytes]] = ..., conf_index: _Optional[int] = ..., conf_term: _Optional[int] = ..., from_address: _Optional[str] = ..., **kwargs) -> None: ...

class RaftBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[RaftMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[RaftMessage, _Mapping]]] = ...) -> None: ...

class StreamClosed(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
