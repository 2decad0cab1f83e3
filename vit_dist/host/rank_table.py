"""HCCL rank tables (Ascend, format version 1.0): generate, merge, validate, inspect.

Entry point ``main(argv)`` backs ``vit-dist rank-table ...``; everything else is pure
functions so the launcher and the tests can reuse them without HCCL hardware.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vit_dist.host.atomic import write_atomic
from vit_dist.host.errors import EXIT_USER_ERROR, UserError

FORMAT_VERSION = "1.0"
DEFAULT_HCCN_CONF = Path("/etc/hccn.conf")
MAX_DEVICE_ID = 15  # up to 16 NPUs per server (e.g. Atlas A3); 8-NPU servers use 0-7
# Server kinds for the device-selection rules (--chip): the Atlas training series (910A, e.g. Atlas 800
# 9000) joins its 8 NPUs in two HCCS groups, 0-3 and 4-7; Atlas A2 and later (910B...) have no such groups.
CHIP_910A, CHIP_910B = "910A", "910B"
HCCS_GROUP = 4  # NPUs per HCCS group on a 910A server
DEVICES_910A = 2 * HCCS_GROUP
RANKS_PER_SERVER_910A = (1, 2, 4, 8)
TOP_KEYS = ("version", "server_count", "server_list", "status")
SERVER_KEYS = ("server_id", "device")
DEVICE_KEYS = ("device_id", "device_ip", "rank_id")
_HCCN_ADDRESS = re.compile(r"\s*address_([0-9]+)\s*=\s*(\S+)\s*$")
_DIGITS = re.compile(r"[0-9]+")


class RankTableError(UserError):
    """A rank table (or its inputs) is unusable; ``problems`` holds one line per issue."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Device:
    device_id: int
    device_ip: str
    rank_id: int


@dataclass(frozen=True)
class Server:
    server_id: str
    devices: tuple[Device, ...]


@dataclass(frozen=True)
class RankTable:
    servers: tuple[Server, ...]

    @property
    def rank_size(self) -> int:
        """Total number of ranks (devices) across all servers."""
        return sum(len(server.devices) for server in self.servers)

    def server_of_rank(self, rank: int) -> Server:
        """The server that runs ``rank`` (a rank of the table)."""
        return next(server for server in self.servers if any(d.rank_id == rank for d in server.devices))

    def servers_with_device(self, device_id: int) -> list[Server]:
        """The servers that list device ``device_id``."""
        return [server for server in self.servers if any(d.device_id == device_id for d in server.devices)]


# --- small value helpers -------------------------------------------------------------


def _is_ipv4(text: str) -> bool:
    """True for a dotted-quad IPv4 address (no leading zeros, no hostnames)."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _as_int(value: object) -> int | None:
    """Integer behind a JSON value given as digit string or number; None otherwise."""
    if isinstance(value, bool):  # bool is an int subclass but never a valid id
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    return None


def _json_type(value: object) -> str:
    """JSON name of a Python value's type, for messages users relate to their file."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _describe(value: object) -> str:
    """``number 2``, ``array [1]``, ``null``: shows why a value was rejected."""
    return "null" if value is None else f"{_json_type(value)} {json.dumps(value)}"


def _shape(value: object) -> str:
    """Short description of a container that should have been a non-empty array."""
    return "an empty array" if value == [] else _json_type(value)


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


# --- parsing inputs ------------------------------------------------------------------


def parse_devices(spec: str) -> list[int]:
    """Parse ``0-7``, ``0,1,2,3`` or ``0-3,6`` into a sorted list of device ids."""
    devices: list[int] = []
    for part in spec.split(","):
        bounds = [piece.strip() for piece in part.split("-")]
        if len(bounds) > 2 or not all(_DIGITS.fullmatch(b) for b in bounds):
            raise RankTableError([f"bad --devices {spec!r}: {part.strip()!r} is not N or N-M"])
        low, high = int(bounds[0]), int(bounds[-1])
        if low > high:
            raise RankTableError([f"bad --devices {spec!r}: range {low}-{high} is reversed"])
        if high > MAX_DEVICE_ID:  # checked before expanding so "0-99999999" cannot eat memory
            raise RankTableError([f"bad --devices {spec!r}: device ids must be 0-{MAX_DEVICE_ID}"])
        devices.extend(range(low, high + 1))
    repeated = sorted(device for device, n in Counter(devices).items() if n > 1)
    if repeated:
        raise RankTableError([f"bad --devices {spec!r}: device(s) {repeated} listed twice"])
    return sorted(devices)


def parse_visible_devices(spec: str) -> list[int]:
    """Parse ``4,5,6,7``: the physical ids of the NPUs a container sees, in the order it numbers them 0, 1, ...
    (as hccl_tools.py's --visible_devices)."""
    words = [word.strip() for word in spec.split(",")]
    if not all(_DIGITS.fullmatch(word) and int(word) <= MAX_DEVICE_ID for word in words):
        raise RankTableError([f"bad --visible-devices {spec!r}: give physical device ids 0-{MAX_DEVICE_ID} "
                              "separated by commas, e.g. 4,5,6,7"])
    physical = [int(word) for word in words]
    if len(set(physical)) != len(physical):
        raise RankTableError([f"bad --visible-devices {spec!r}: a device is listed twice"])
    return physical


def physical_devices(devices: Sequence[int], visible: Sequence[int] | None) -> list[int]:
    """The physical ids of ``devices`` numbered as the container sees them (its ``visible`` devices; None:
    no renumbering)."""
    if visible is None:
        return list(devices)
    hidden = [device for device in devices if device >= len(visible)]
    if hidden:
        raise RankTableError([f"--devices {hidden[0]} is not visible: --visible-devices lists {len(visible)} "
                              f"device(s), which this container numbers 0-{len(visible) - 1}"])
    return [visible[device] for device in devices]


def read_hccn_conf(path: Path) -> dict[int, str]:
    """Device id -> device IP from the ``address_N=IP`` lines of an hccn.conf file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RankTableError([f"cannot read hccn.conf {path}: {exc.strerror}"]) from exc
    return {
        int(match.group(1)): match.group(2)
        for match in map(_HCCN_ADDRESS.match, text.splitlines())
        if match
    }


def resolve_hccn_conf(path: Path | None) -> Path:
    """The hccn.conf to use: the given one, else the system default if present."""
    if path is not None:
        return path
    if DEFAULT_HCCN_CONF.is_file():
        return DEFAULT_HCCN_CONF
    raise RankTableError([
        f"{DEFAULT_HCCN_CONF} not found (not an Ascend host?); pass --hccn-conf FILE "
        "with address_N=IP lines, e.g. built from `hccn_tool -i N -ip -g`"
    ])


# --- building and serialising ------------------------------------------------------


def build_server_table(server_ip: str, devices: Sequence[int], device_ips: dict[int, str],
                       source: str) -> RankTable:
    """Single-server table with ranks 0..N-1 in device order; ``source`` names the IP file."""
    problems = [] if _is_ipv4(server_ip) else [f"--server-ip {server_ip!r} is not an IPv4 address"]
    for device_id in devices:
        ip = device_ips.get(device_id)
        if ip is None:
            problems.append(f"{source}: no address_{device_id}= line for device {device_id}")
        elif not _is_ipv4(ip):
            problems.append(f"{source}: address_{device_id}={ip} is not an IPv4 address")
    if problems:
        raise RankTableError(problems)
    return RankTable((Server(server_ip, tuple(
        Device(device_id, device_ips[device_id], rank) for rank, device_id in enumerate(devices)
    )),))


def merge_tables(tables: Sequence[RankTable]) -> RankTable:
    """Concatenate servers in the given order and renumber ranks 0..N-1."""
    servers = [server for table in tables for server in table.servers]
    counts = Counter(server.server_id for server in servers)
    duplicates = [sid for sid, n in counts.items() if n > 1]
    if duplicates:
        raise RankTableError([f"server_id {sid} appears in {counts[sid]} inputs; merge each server once"
                              for sid in duplicates])
    ranks = itertools.count()
    return RankTable(tuple(
        Server(s.server_id, tuple(Device(d.device_id, d.device_ip, next(ranks)) for d in s.devices))
        for s in servers
    ))


def table_to_json(table: RankTable) -> dict[str, Any]:
    """JSON object in the documented 1.0 layout; every value is a string as HCCL expects."""
    return {
        "version": FORMAT_VERSION,
        "server_count": str(len(table.servers)),
        "server_list": [
            {
                "server_id": server.server_id,
                "device": [
                    {"device_id": str(d.device_id), "device_ip": d.device_ip, "rank_id": str(d.rank_id)}
                    for d in server.devices
                ],
                "host_nic_ip": "reserve",
            }
            for server in table.servers
        ],
        "status": "completed",
    }


def _table_from_json(obj: dict[str, Any]) -> RankTable:
    """Dataclass view of a JSON table that ``validate_table`` accepted."""
    return RankTable(tuple(
        Server(server["server_id"], tuple(
            Device(int(d["device_id"]), d["device_ip"], int(d["rank_id"])) for d in server["device"]
        ))
        for server in obj["server_list"]
    ))


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON so readers (e.g. workers on a shared FS) never see a partial file."""
    write_atomic(path, json.dumps(obj, indent=4) + "\n", durable=True)


# --- validation --------------------------------------------------------------------


def _missing_keys(obj: dict[str, Any], keys: Sequence[str], where: str) -> list[str]:
    return [_at(where, f"missing key {key!r}") for key in keys if key not in obj]


def _not_string(obj: dict[str, Any], key: str, where: str) -> list[str]:
    value = obj.get(key)
    if key not in obj or isinstance(value, str):
        return []
    return [_at(where, f"{key} must be a JSON string, got {_describe(value)}")]


def _check_top(obj: dict[str, Any]) -> list[str]:
    problems = _missing_keys(obj, TOP_KEYS, "") + _not_string(obj, "server_count", "")
    if "version" in obj and obj["version"] != FORMAT_VERSION:
        problems.append(f"version must be \"{FORMAT_VERSION}\", got {json.dumps(obj['version'])}")
    if "status" in obj and obj["status"] != "completed":
        problems.append(f"status must be \"completed\", got {json.dumps(obj['status'])}")
    servers = obj.get("server_list")
    if "server_list" in obj and not (isinstance(servers, list) and servers):
        problems.append(f"server_list must be a non-empty array, got {_shape(servers)}")
    if "server_count" in obj:
        count = _as_int(obj["server_count"])
        if count is None:
            problems.append(f"server_count {json.dumps(obj['server_count'])} is not a non-negative integer")
        elif isinstance(servers, list) and count != len(servers):
            problems.append(f"server_count is {count} but server_list has {len(servers)} server(s)")
    return problems


def _check_device(device: object, where: str) -> tuple[list[str], int | None, int | None]:
    """Problems of one device entry, plus its device id and rank id when readable."""
    if not isinstance(device, dict):
        return [_at(where, f"device entry must be an object, got {_json_type(device)}")], None, None
    problems = _missing_keys(device, DEVICE_KEYS, where)
    for key in DEVICE_KEYS:
        problems += _not_string(device, key, where)
    device_id = _as_int(device.get("device_id"))
    if "device_id" in device and device_id is None:
        problems.append(_at(where, f"device_id {json.dumps(device['device_id'])} is not an integer"))
    elif device_id is not None and not 0 <= device_id <= MAX_DEVICE_ID:
        problems.append(_at(where, f"device_id {device_id} is out of range 0-{MAX_DEVICE_ID}"))
    ip = device.get("device_ip")
    if isinstance(ip, str) and not _is_ipv4(ip):
        problems.append(_at(where, f"device_ip {json.dumps(ip)} is not a dotted IPv4 address"))
    rank_id = _as_int(device.get("rank_id"))
    if "rank_id" in device and rank_id is None:
        problems.append(_at(where, f"rank_id {json.dumps(device['rank_id'])} is not a non-negative integer"))
    return problems, device_id, rank_id


def _check_server(server: object, where: str) -> tuple[list[str], list[tuple[int | None, str]]]:
    """Problems of one server entry, plus (rank id or None, location) for each device."""
    if not isinstance(server, dict):
        return [_at(where, f"server entry must be an object, got {_json_type(server)}")], []
    problems = _missing_keys(server, SERVER_KEYS, where) + _not_string(server, "server_id", where)
    server_id = server.get("server_id")
    if isinstance(server_id, str) and not _is_ipv4(server_id):
        problems.append(_at(where, f"server_id {json.dumps(server_id)} is not a dotted IPv4 address"))
    devices = server.get("device")
    if "device" in server and not (isinstance(devices, list) and devices):
        problems.append(_at(where, f"device must be a non-empty array, got {_shape(devices)}"))
        devices = []
    ranks: list[tuple[int | None, str]] = []
    device_ids: dict[int, int] = defaultdict(int)
    for index, device in enumerate(devices or []):
        device_where = f"{where}.device[{index}]"
        device_problems, device_id, rank_id = _check_device(device, device_where)
        problems += device_problems
        ranks.append((rank_id, device_where))
        if device_id is not None:
            device_ids[device_id] += 1
    problems += [_at(where, f"device_id {did} appears {n} times on this server")
                 for did, n in device_ids.items() if n > 1]
    return problems, ranks


def _check_ranks(ranks: list[tuple[int | None, str]]) -> list[str]:
    """HCCL needs each rank once and exactly 0..N-1 (N = number of devices)."""
    where_by_rank: dict[int, list[str]] = defaultdict(list)
    for rank, where in ranks:
        if rank is not None:
            where_by_rank[rank].append(where)
    problems = [f"rank_id {rank} is used more than once: {', '.join(places)}"
                for rank, places in sorted(where_by_rank.items()) if len(places) > 1]
    # An unreadable rank id is already reported; judging coverage without it would only add noise.
    if not ranks or any(rank is None for rank, _ in ranks):
        return problems
    expected = set(range(len(ranks)))
    missing, unexpected = sorted(expected - where_by_rank.keys()), sorted(where_by_rank.keys() - expected)
    if missing or unexpected:
        details = [f"missing {', '.join(map(str, missing))}"] if missing else []
        details += [f"unexpected {', '.join(map(str, unexpected))}"] if unexpected else []
        problems.append(f"rank ids must be exactly 0..{len(ranks) - 1} for {len(ranks)} devices: "
                        + "; ".join(details))
    return problems


def validate_table(obj: object) -> list[str]:
    """Every problem in a parsed rank table, one message each; empty means valid."""
    if not isinstance(obj, dict):
        return [f"top level must be a JSON object, got {_json_type(obj)}"]
    problems = _check_top(obj)
    servers = obj.get("server_list")
    ranks: list[tuple[int | None, str]] = []
    server_where: dict[str, str] = {}
    for index, server in enumerate(servers if isinstance(servers, list) else []):
        where = f"server_list[{index}]"
        server_problems, server_ranks = _check_server(server, where)
        problems += server_problems
        ranks += server_ranks
        server_id = server.get("server_id") if isinstance(server, dict) else None
        if isinstance(server_id, str) and server_id in server_where:
            problems.append(_at(where, f"server_id {server_id} already used by {server_where[server_id]}"))
        elif isinstance(server_id, str):
            server_where[server_id] = where
    return problems + _check_ranks(ranks)


def hccs_problems(table: RankTable) -> list[str]:
    """Device selections HCCL refuses on Atlas training (910A) servers, one message each: a server takes 1, 2, 4
    or all 8 of its NPUs, 2 or 4 from one HCCS group (0-3 or 4-7), and every server the same number (the
    HCCL guide's rule for the Atlas training series; hccl_tools.py checks the group part)."""
    problems = []
    for index, server in enumerate(table.servers):
        ids = sorted(device.device_id for device in server.devices)
        where = f"server_list[{index}] ({server.server_id})"
        listed = ", ".join(map(str, ids))
        if ids[-1] >= DEVICES_910A:
            problems.append(f"{where}: device {ids[-1]} does not exist on a 910A server (devices 0-7)")
        elif len(ids) not in RANKS_PER_SERVER_910A:
            problems.append(f"{where}: {len(ids)} devices ({listed}); a 910A server runs 1, 2 or 4 devices of one "
                            "HCCS group (0-3 or 4-7), or all 8")
        elif len(ids) < DEVICES_910A and ids[0] // HCCS_GROUP != ids[-1] // HCCS_GROUP:
            problems.append(f"{where}: devices {listed} span both HCCS groups of a 910A server; use devices within "
                            "0-3 or within 4-7, or all 8")
    counts = sorted({len(server.devices) for server in table.servers})
    if len(counts) > 1:
        problems.append(f"the servers use {' or '.join(map(str, counts))} devices; on 910A servers every server "
                        "must use the same number")
    return problems


def check_chip(table: RankTable, chip: str | None, source: str) -> None:
    """Applies the 910A rules (hccs_problems) as ``chip`` says: refused for 910A, skipped for 910B, and for
    an unnamed chip each broken rule is a warning on stderr (the table serves Atlas A2 servers as it is)."""
    if chip == CHIP_910B:
        return
    problems = [_at(source, problem) for problem in hccs_problems(table)]
    if chip == CHIP_910A and problems:
        raise RankTableError(problems)
    for problem in problems:
        print(f"warning: {problem} (fine on Atlas A2/910B servers; say which with --chip {CHIP_910A} or "
              f"--chip {CHIP_910B})", file=sys.stderr)


def load_rank_table(path: str | Path) -> RankTable:
    """Read and validate a rank table file; RankTableError lists all problems, file-prefixed."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RankTableError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise RankTableError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise RankTableError([f"{path}: {message}"]) from exc
    problems = validate_table(obj)
    if problems:
        raise RankTableError([f"{path}: {problem}" for problem in problems])
    return _table_from_json(obj)


# --- command line --------------------------------------------------------------------


def _emit(table: RankTable, out: Path | None) -> None:
    if out is None:
        print(json.dumps(table_to_json(table), indent=4))
    else:
        write_json_atomic(out, table_to_json(table))


def _cmd_generate(args: argparse.Namespace) -> int:
    visible = None if args.visible_devices is None else parse_visible_devices(args.visible_devices)
    devices = physical_devices(parse_devices(args.devices), visible)
    hccn_conf = resolve_hccn_conf(args.hccn_conf)
    table = build_server_table(args.server_ip, devices, read_hccn_conf(hccn_conf), str(hccn_conf))
    check_chip(table, args.chip, "")
    _emit(table, args.out)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    tables, problems = [], []
    for path in args.tables:  # load all first so every broken input is reported at once
        try:
            tables.append(load_rank_table(path))
        except RankTableError as exc:
            problems += exc.problems
    if problems:
        raise RankTableError(problems)
    _emit(merge_tables(tables), args.out)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    table = load_rank_table(args.table)
    check_chip(table, args.chip, str(args.table))
    print(f"{args.table}: OK: {len(table.servers)} server(s), {table.rank_size} rank(s)")
    return 0


def _cmd_local_ranks(args: argparse.Namespace) -> int:
    table = load_rank_table(args.table)
    if not 0 <= args.server_index < len(table.servers):
        raise RankTableError([f"{args.table}: --server-index {args.server_index} out of range; "
                              f"the table has {len(table.servers)} server(s) (0..{len(table.servers) - 1})"])
    server = table.servers[args.server_index]
    logical = _logical_ids(server, args)
    print(f"rank_size {table.rank_size}")
    print(f"server_count {len(table.servers)}")
    print(f"server_id {server.server_id}")
    for device in server.devices:
        print(f"device {device.device_id} {device.rank_id} {logical[device.device_id]}")
    from vit_dist.bootstrap import launcher_variables  # the bootstrap reads rank tables with this module

    for name in launcher_variables():
        print(f"foreign {name}")
    return 0


def _logical_ids(server: Server, args: argparse.Namespace) -> dict[int, int]:
    """Physical device id -> the id this container gives it (its position in --visible-devices)."""
    ids = [device.device_id for device in server.devices]
    if args.visible_devices is None:
        return {device: device for device in ids}
    visible = parse_visible_devices(args.visible_devices)
    missing = [device for device in ids if device not in visible]
    if missing:
        raise RankTableError([f"{args.table}: device {missing[0]} of server {args.server_index} "
                              f"({server.server_id}) is not among --visible-devices {args.visible_devices}; "
                              "list every physical device this container was given, in its order"])
    return {device: visible.index(device) for device in ids}


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for ``vit-dist rank-table``."""
    parser = argparse.ArgumentParser(prog="vit-dist rank-table",
                                     description="Create and check HCCL rank tables (Ascend).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="one-server table from hccn.conf device IPs")
    gen.add_argument("--devices", required=True, help="device ids: 0-7, 0,1,2,3 or 0-3,6")
    gen.add_argument("--server-ip", required=True, help="IPv4 address of this server")
    gen.add_argument("--hccn-conf", type=Path,
                     help=f"file with address_N=IP lines (default {DEFAULT_HCCN_CONF})")
    gen.add_argument("--visible-devices", metavar="IDS",
                     help="in a container: the physical ids of the devices it sees as 0, 1, ..., e.g. 4,5,6,7; "
                          "--devices then counts from 0 as the container does, the table holds the physical ids")
    _add_chip_option(gen)
    gen.add_argument("--out", type=Path, help="write here atomically instead of stdout")
    gen.set_defaults(func=_cmd_generate)

    merge = sub.add_parser("merge", help="join per-server tables; ranks renumbered in file order")
    merge.add_argument("tables", nargs="+", type=Path, metavar="TABLE")
    merge.add_argument("--out", type=Path, help="write here atomically instead of stdout")
    merge.set_defaults(func=_cmd_merge)

    validate = sub.add_parser("validate", help="report every problem in a table")
    validate.add_argument("table", type=Path, metavar="TABLE")
    _add_chip_option(validate)
    validate.set_defaults(func=_cmd_validate)

    local = sub.add_parser("local-ranks", help="devices and ranks of one server, and the variables of another "
                                               "launcher in this environment (for launchers)")
    local.add_argument("table", type=Path, metavar="TABLE")
    local.add_argument("--server-index", type=int, default=0, help="position in server_list (default 0)")
    local.add_argument("--visible-devices", metavar="IDS",
                       help="as for generate: each device line then ends with the id this container gives it")
    local.set_defaults(func=_cmd_local_ranks)
    return parser


def _add_chip_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chip", choices=(CHIP_910A, CHIP_910B),
                        help=f"{CHIP_910A}: refuse device selections HCCL refuses on Atlas training servers (1, 2 "
                             f"or 4 devices of one HCCS group 0-3/4-7, or all 8); {CHIP_910B}: Atlas A2 and "
                             "later, no such rule; unset: warn")


def main(argv: list[str]) -> int:
    """Run ``vit-dist rank-table`` with ``argv`` (the words after ``rank-table``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help / usage errors; callers want a code
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except RankTableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USER_ERROR
