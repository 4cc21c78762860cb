from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEARIZABLE: _ClassVar[Consistency]
    LEASE: _ClassVar[Consistency]
    STALE: _ClassVar[Consistency]
LINEARIZABLE: Consistency
LEASE: Consistency
STALE: Consistency

class Session(_message.Message):
    __slots__ = ("client_id", "sequence", "first_outstanding")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    sequence: int
    first_outstanding: int
    def __init__(self, client_id: _Optional[int] = ..., sequence: _Optional[int] = ..., first_outstanding: _Optional[int] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "create_revision", "mod_revision", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., create_revision: _Optional[int] = ..., mod_revision: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "value", "session", "prev_kv")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PREV_KV_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    session: Session
    prev_kv: bool
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., prev_kv: _Optional[bool] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("revision", "prev")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    revision: int
    prev: KeyValue
    def __init__(self, revision: _Optional[int] = ..., prev: _Optional[_Union[KeyValue, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "consistency")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    consistency: Consistency
    def __init__(self, key: _Optional[bytes] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "kv", "revision")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    kv: KeyValue
    revision: int
    def __init__(self, found: _Optional[bool] = ..., kv: _Optional[_Union[KeyValue, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "session")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    session: Session
    def __init__(self, key: _Optional[bytes] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "revision", "prev")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    revision: int
    prev: KeyValue
    def __init__(self, deleted: _Optional[bool] = ..., revision: _Optional[int] = ..., prev: _Optional[_Union[KeyValue, _Mapping]] = ...) -> None: ...

class CompareAndSwapRequest(_message.Message):
    __slots__ = ("key", "has_expected", "expected", "value", "session")
    KEY_FIELD_NUMBER: _ClassVar[int]
    HAS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    has_expected: bool
    expected: bytes
    value: bytes
    session: Session
    def __init__(self, key: _Optional[bytes] = ..., has_expected: _Optional[bool] = ..., expected: _Optional[bytes] = ..., value: _Optional[bytes] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class CompareAndSwapResponse(_message.Message):
    __slots__ = ("succeeded", "revision", "current")
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    succeeded: bool
    revision: int
    current: KeyValue
    def __init__(self, succeeded: _Optional[bool] = ..., revision: _Optional[int] = ..., current: _Optional[_Union[KeyValue, _Mapping]] = ...) -> None: ...

class RangeRequest(_message.Message):
    __slots__ = ("prefix", "limit", "consistency")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    prefix: bytes
    limit: int
    consistency: Consistency
    def __init__(self, prefix: _Optional[bytes] = ..., limit: _Optional[int] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class RangeResponse(_message.Message):
    __slots__ = ("kvs", "revision")
    KVS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    kvs: _containers.RepeatedCompositeFieldContainer[KeyValue]
    revision: int
    def __init__(self, kvs: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("put", "get", "delete", "cas")
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    CAS_FIELD_NUMBER: _ClassVar[int]
    put: PutRequest
    get: GetRequest
    delete: DeleteRequest
    cas: CompareAndSwapRequest
    def __init__(self, put: _Optional[_Union[PutRequest, _Mapping]] = ..., get: _Optional[_Union[GetRequest, _Mapping]] = ..., delete: _Optional[_Union[DeleteRequest, _Mapping]] = ..., cas: _Optional[_Union[CompareAndSwapRequest, _Mapping]] = ...) -> None: ...

class OperationResult(_message.Message):
    __slots__ = ("put", "get", "delete", "cas", "error")
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    CAS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    put: PutResponse
    get: GetResponse
    delete: DeleteResponse
    cas: CompareAndSwapResponse
    error: str
    def __init__(self, put: _Optional[_Union[PutResponse, _Mapping]] = ..., get: _Optional[_Union[GetResponse, _Mapping]] = ..., delete: _Optional[_Union[DeleteResponse, _Mapping]] = ..., cas: _Optional[_Union[CompareAndSwapResponse, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[Operation]
    def __init__(self, ops: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[OperationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[OperationResult, _Mapping]]] = ...) -> None: ...

class StreamedBatch(_message.Message):
    __slots__ = ("id", "batch")
    ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    id: int
    batch: bytes
    def __init__(self, id: _Optional[int] = ..., batch: _Optional[bytes] = ...) -> None: ...

class StreamedBatchAnswer(_message.Message):
    __slots__ = ("id", "batch", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    batch: bytes
    code: int
    message: str
    def __init__(self, id: _Optional[int] = ..., batch: _Optional[bytes] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("prefix", "start_revision")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    prefix: bytes
    start_revision: int
    def __init__(self, prefix: _Optional[bytes] = ..., start_revision: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "kv", "prev", "revision")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PUT: _ClassVar[WatchEvent.Type]
        DELETE: _ClassVar[WatchEvent.Type]
    PUT: WatchEvent.Type
    DELETE: WatchEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: WatchEvent.Type
    kv: KeyValue
    prev: KeyValue
    revision: int
    def __init__(self, type: _Optional[_Union[WatchEvent.Type, str]] = ..., kv: _Optional[_Union[KeyValue, _Mapping]] = ..., prev: _Optional[_Union[KeyValue, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("events", "revision")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[WatchEvent]
    revision: int
    def __init__(self, events: _Optional[_Iterable[_Union[WatchEvent, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...
