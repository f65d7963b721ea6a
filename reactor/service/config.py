"""The configuration file: the same settings as ``run``'s flags, plus per-VM names.

YAML, validated with a pydantic schema whose errors are mapped back to the
YAML node, so a mistake reads ``FILE:LINE:COL: error: ...`` like a rule error.
Flags override the file. ``Config()`` with no file is a working default.
"""

from __future__ import annotations

import fnmatch
import grp
import pwd
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from reactor.actions.restart_vm import BackoffParams
from reactor.durations import parse_duration
from reactor.errors import ConfigError, Diagnostic, Location, RuleError
from reactor.model import RetryPolicy
from reactor.plugins.api import ActionSettings
from reactor.rules.catalog import parse_release
from reactor.rules.yamlload import MarkedDict, MarkedList, load_file, plain

if TYPE_CHECKING:
    from reactor.sources.server import ListenPolicy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _seconds(value: Any) -> float:
    return parse_duration(value)


class RetryConfig(_Strict):
    """Default retry policy of every action (a rule's ``retry:`` overrides it)."""

    attempts: int = Field(5, ge=1)
    initial: float = 1.0
    max: float = 60.0
    multiplier: float = Field(2.0, ge=1)
    jitter: float = 1.0

    _durations = field_validator("initial", "max", "jitter", mode="before")(_seconds)

    def policy(self) -> RetryPolicy:
        """As the model's RetryPolicy."""
        return RetryPolicy(self.attempts, self.initial, self.max, self.multiplier, self.jitter)


class ExecConfig(_Strict):
    """The ``exec`` action runs programs: off until the operator turns it on."""

    enabled: bool = False


class QmpActionConfig(_Strict):
    """Commands the ``qmp`` action may send."""

    allow: list[str] = Field(
        default_factory=lambda: ["cont", "stop", "system_reset", "system_powerdown", "query-status"]
    )


class RestartConfig(_Strict):
    """The restart guard: at most ``limit`` restarts per VM per ``window``, and the crash-loop
    ``backoff`` of every ``restart_vm`` whose rule sets none."""

    limit: int = Field(3, ge=1)
    window: float = 600.0
    backoff: BackoffParams | None = None

    _durations = field_validator("window", mode="before")(_seconds)


class NotifyConfig(_Strict):
    """Default Apprise URLs for ``notify`` actions that name none."""

    urls: list[str] = Field(default_factory=list)


class ActionsConfig(_Strict):
    """Defaults and limits of action execution."""

    retry: RetryConfig = Field(default_factory=RetryConfig)
    timeout: float = 30.0
    max_concurrency: int = Field(64, ge=1)
    limits: dict[str, int] = Field(default_factory=dict)
    exec: ExecConfig = Field(default_factory=ExecConfig)
    qmp: QmpActionConfig = Field(default_factory=QmpActionConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    _durations = field_validator("timeout", mode="before")(_seconds)

    def settings(self) -> ActionSettings:
        """The ActionSettings actions obey."""
        backoff = self.restart.backoff
        return ActionSettings(
            exec_enabled=self.exec.enabled,
            qmp_allowlist=frozenset(self.qmp.allow),
            restart_limit=self.restart.limit,
            restart_window=self.restart.window,
            restart_backoff=None if backoff is None else backoff.model_dump(),
            extra={"notify_urls": list(self.notify.urls)},
        )


LabelValue = StrictStr | StrictBool | StrictInt | StrictFloat


class VmConfig(_Strict):
    """One VM: its QMP address and the name rules see, and labels rules see as ``$.labels``.

    Without ``address``, ``name`` is a glob: its labels go to every VM it matches.
    """

    address: str | None = None
    name: str | None = None
    labels: dict[str, LabelValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _address_or_name(self) -> VmConfig:
        if self.address is None and self.name is None:
            raise ValueError("a VM needs an address or a name (a glob, to give labels)")
        if self.address is None and not self.labels:
            raise ValueError(f"VM {self.name!r} has no address: it is here for its labels")
        return self

    def gives(self, name: str, address: str | None) -> bool:
        """Whether this entry's labels go to the VM ``name`` at ``address``.

        With no address (a replay, a rule test) an entry with an address gives its
        labels to the VM it names.
        """
        if address is None:
            return self.name is not None and (
                self.name == name
                if self.address is not None
                else fnmatch.fnmatchcase(name, self.name)
            )
        if self.address is not None:
            return self.address == address and (self.name is None or self.name == name)
        return self.name is not None and fnmatch.fnmatchcase(name, self.name)


class MetricsConfig(_Strict):
    """The Prometheus metrics and /healthz listener (loopback unless set otherwise)."""

    listen: str | None = "127.0.0.1:9105"


def _uid(value: str | int) -> int:
    return value if isinstance(value, int) else _id_of("user", value)


def _gid(value: str | int) -> int:
    return value if isinstance(value, int) else _id_of("group", value)


def _id_of(kind: str, name: str) -> int:
    """The uid of user ``name`` or the gid of group ``name``; ValueError if there is none."""
    try:
        return pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"no {kind} {name!r} on this host") from None


def _known_user(value: str | int) -> str | int:
    _uid(value)
    return value


def _known_group(value: str | int) -> str | int:
    _gid(value)
    return value


UserName = Annotated[str | int, AfterValidator(_known_user)]
GroupName = Annotated[str | int, AfterValidator(_known_group)]


class ListenerConfig(_Strict):
    """Who may connect to the ``listen`` socket, and how many at once.

    ``group``: the unix socket is 0660 owned by this group (else 0600, our user
    only). ``allow_users``/``allow_groups``: when either is given, a peer is
    accepted only if the kernel says its uid is one of the users or its primary
    gid one of the groups (TCP peers, which have no credentials, are then refused).
    """

    group: GroupName | None = None
    allow_users: list[UserName] | None = None
    allow_groups: list[GroupName] | None = None
    max_handshakes: int = Field(64, ge=1)
    max_sessions: int = Field(1024, ge=1)

    def policy(self) -> ListenPolicy:
        """As the listener's ListenPolicy (names resolved to ids now)."""
        from reactor.sources.server import ListenPolicy  # the listener's module: not for check

        users, groups = self.allow_users, self.allow_groups
        return ListenPolicy(
            group=None if self.group is None else _gid(self.group),
            uids=None if users is None else frozenset(_uid(u) for u in users),
            gids=None if groups is None else frozenset(_gid(g) for g in groups),
            max_handshakes=self.max_handshakes,
            max_sessions=self.max_sessions,
        )


class NatsCredentials(_Strict):
    """How the sidecar proves itself to NATS; any value may be a ``${file:}``/``${env:}``."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed: str | None = None
    creds_file: str | None = None


_SUBJECT_TOKEN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"


class NatsConfig(_Strict):
    """NATS JetStream: where events are published and commands answered (docs/fleet.md)."""

    url: str | None = None
    stream: str = Field("QMP", pattern=r"^[A-Za-z0-9_-]+$")
    subject_prefix: str = Field("qmp", pattern=_SUBJECT_TOKEN)
    credentials: NatsCredentials = Field(default_factory=NatsCredentials)
    outbox_max_bytes: int = Field(256 * 1024 * 1024, ge=4096)
    """The publisher's backlog while NATS is away; past it new events are not queued."""
    commands: bool = True
    """Answer restart_vm/resume_vm/qmp commands on ``<prefix>.<host>.cmd``."""
    central: bool = False
    """Run the rules over the stream (``run --from-nats``) instead of publishing."""
    durable: str = Field("qmp-reactor-central", pattern=r"^[A-Za-z0-9_-]+$")
    command_timeout: float = 120.0
    ack_wait: float = 30.0
    """How long a central instance has to journal a message's firings before it is redelivered."""

    _durations = field_validator("command_timeout", "ack_wait", mode="before")(_seconds)


class Config(_Strict):
    """Everything ``qmp-reactor run`` can be told; flags override these."""

    rules: list[str] = Field(default_factory=list)
    plugin_dirs: list[str] = Field(default_factory=lambda: ["plugins"])
    block_plugins: list[str] = Field(default_factory=list)
    state_dir: str | None = None
    qmp: list[str] = Field(default_factory=list)
    qmp_glob: list[str] = Field(default_factory=list)
    listen: str | None = None
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    libvirt: list[str] = Field(default_factory=list)
    """libvirt URIs whose domains are VMs (``run --libvirt``)."""
    vms: list[VmConfig] = Field(default_factory=list)
    qemu_stage: bool = True
    engine_state: bool = True
    """Keep the engine's windows, held events and the restart guard's history in the state
    directory across restarts (``reactor.service.enginestate``)."""
    qemu_versions: list[str] = Field(default_factory=list)
    """The QEMU releases the site runs: ``check --config`` judges the rules against them."""
    greeting_timeout: float = 5.0
    reconnect_max: float = 2.0
    shutdown_grace: float = 10.0
    reconcile: float = 30.0
    """Seconds between probes of every VM's run state (0: off)."""
    log_format: Literal["text", "json"] = "text"
    verbose: bool = False
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    host: str | None = None
    """This host's name in the fleet (default: the machine's hostname)."""
    nats: NatsConfig = Field(default_factory=NatsConfig)

    _durations = field_validator(
        "greeting_timeout", "reconnect_max", "shutdown_grace", "reconcile", mode="before"
    )(_seconds)

    @field_validator("qemu_versions")
    @classmethod
    def _versions(cls, value: list[str]) -> list[str]:
        for text in value:
            if parse_release(text) is None:
                raise ValueError(f"{text!r} is not a QEMU version (e.g. 7.2 or 7.2.0)")
        return value

    def vm_names(self) -> dict[str, str]:
        """Address → name for the VMs the file names."""
        return {vm.address: vm.name for vm in self.vms if vm.name and vm.address}

    def labels_of(self, name: str, address: str | None = None) -> Mapping[str, Any]:
        """The labels of the VM ``name`` at ``address``: every matching entry's, later ones win.

        Without ``address`` (replay, rule tests): the entries that give ``name`` labels by name.
        """
        labels: dict[str, Any] = {}
        for vm in self.vms:
            if vm.labels and vm.gives(name, address):
                labels.update(vm.labels)
        return labels

    def label_names(self) -> frozenset[str]:
        """Every label name some VM entry defines (``check`` knows them)."""
        return frozenset(name for vm in self.vms for name in vm.labels)


def _locate(node: Any, loc: tuple[Any, ...], fallback: Location) -> Location:
    """The YAML location of the value at ``loc`` (as deep as the file has it)."""
    where = getattr(node, "location", fallback)
    for step in loc:
        if (isinstance(node, MarkedDict) and step in node) or (
            isinstance(node, MarkedList) and isinstance(step, int) and step < len(node)
        ):
            where = node.loc(step)
            node = node[step]
        else:
            break
    return where


def _problems(err: ValidationError, doc: Any, fallback: Location) -> list[Diagnostic]:
    diags = []
    for e in err.errors(include_url=False, include_input=False):
        loc = tuple(e.get("loc", ()))
        name = ".".join(str(p) for p in loc)
        where = _locate(doc, loc, fallback)
        if e.get("type") == "extra_forbidden":
            msg = f"unknown setting {name!r}"
        elif e.get("type") == "missing":
            msg = f"missing setting '{name}'"
        else:
            text = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            msg = f"'{name}': {text}"
        diags.append(Diagnostic(where, msg))
    return diags


def load_config(path: Path | None) -> Config:
    """The configuration in ``path`` (None: defaults); ConfigError lists every problem."""
    if path is None:
        return Config()
    try:
        doc = load_file(path)
    except RuleError as err:
        raise ConfigError("invalid configuration", err.diagnostics) from None
    fallback = Location(str(path), 1, 1)
    if doc is None:
        return Config()
    if not isinstance(doc, MarkedDict):
        raise ConfigError("invalid configuration", [Diagnostic(fallback, "a mapping expected")])
    try:
        return Config.model_validate(plain(doc))
    except ValidationError as err:
        raise ConfigError("invalid configuration", _problems(err, doc, fallback)) from None
