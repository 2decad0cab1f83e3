"""HCCL rank-table tooling: generator, merger, validator and the launcher's dry run.

HCCL cannot run here, so the launcher is exercised with --dry-run and, after its real pre-flight check
of a tiny config and data set, with a stand-in worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, run, tiny_config, tool_env
from vit_dist.host.rank_table import (
    Device,
    RankTableError,
    load_rank_table,
    main,
    parse_devices,
    validate_table,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "rank_tables"
LAUNCHER = ROOT / "launch" / "rank_table.sh"


def write_hccn_conf(path: Path, subnet: int, devices: range = range(8)) -> Path:
    """hccn.conf as hccn_tool leaves it: address_N plus unrelated netmask_N lines."""
    lines = [f"address_{d}=192.168.{subnet}.{101 + d}\nnetmask_{d}=255.255.255.0\n" for d in devices]
    path.write_text("".join(lines))
    return path


def generate(tmp_path: Path, server_ip: str, subnet: int, devices: str = "0-7") -> Path:
    out = tmp_path / f"server_{server_ip}.json"
    hccn = write_hccn_conf(tmp_path / f"hccn_{subnet}.conf", subnet)
    assert main(["generate", "--devices", devices, "--server-ip", server_ip,
                 "--hccn-conf", str(hccn), "--out", str(out)]) == 0
    return out


@pytest.fixture()
def two_server_table(tmp_path: Path) -> Path:
    first = generate(tmp_path, "10.0.0.1", 100)
    second = generate(tmp_path, "10.0.0.2", 101)
    merged = tmp_path / "merged.json"
    assert main(["merge", str(first), str(second), "--out", str(merged)]) == 0
    return merged


# --- generate ------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("0-7", list(range(8))),
    ("0,1,2,3", [0, 1, 2, 3]),
    ("0-3,6", [0, 1, 2, 3, 6]),
    ("5", [5]),
    ("6, 0-1", [0, 1, 6]),
])
def test_parse_devices_accepts_ranges_and_lists(spec: str, expected: list[int]) -> None:
    assert parse_devices(spec) == expected


@pytest.mark.parametrize(("spec", "fragment"), [
    ("", "is not N or N-M"),
    ("0-", "is not N or N-M"),
    ("a,b", "is not N or N-M"),
    ("3-1", "reversed"),
    ("0-3,2", "listed twice"),
    ("0-16", "must be 0-15"),
    ("0-99999999999", "must be 0-15"),
])
def test_parse_devices_rejects_bad_specs(spec: str, fragment: str) -> None:
    with pytest.raises(RankTableError, match=fragment):
        parse_devices(spec)


def test_generate_writes_documented_format(tmp_path: Path) -> None:
    hccn = write_hccn_conf(tmp_path / "hccn.conf", 100)
    out = tmp_path / "table.json"
    assert main(["generate", "--devices", "0-3,6", "--server-ip", "192.98.92.100",
                 "--hccn-conf", str(hccn), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": "192.98.92.100",
            "device": [
                {"device_id": str(d), "device_ip": f"192.168.100.{101 + d}", "rank_id": str(rank)}
                for rank, d in enumerate([0, 1, 2, 3, 6])
            ],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hccn.conf", "table.json"]  # no temp left


def test_generate_prints_to_stdout_without_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hccn = write_hccn_conf(tmp_path / "hccn.conf", 100)
    assert main(["generate", "--devices", "0,1", "--server-ip", "10.1.1.1", "--hccn-conf", str(hccn)]) == 0
    table = json.loads(capsys.readouterr().out)
    ips = [d["device_ip"] for d in table["server_list"][0]["device"]]
    assert ips == ["192.168.100.101", "192.168.100.102"]


def test_generate_names_device_missing_from_hccn_conf(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    hccn = write_hccn_conf(tmp_path / "hccn.conf", 100, range(4))
    assert main(["generate", "--devices", "0-5", "--server-ip", "10.1.1.1", "--hccn-conf", str(hccn)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{hccn}: no address_4= line for device 4", f"{hccn}: no address_5= line for device 5"]


@pytest.mark.skipif(Path("/etc/hccn.conf").exists(), reason="this host has a real /etc/hccn.conf")
def test_generate_without_hccn_conf_explains_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--devices", "0-7", "--server-ip", "10.1.1.1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "/etc/hccn.conf not found" in err[0] and "--hccn-conf" in err[0]


def generate_args(tmp_path: Path, devices: str, *options: str) -> tuple[list[str], Path]:
    """generate's arguments for `devices` of server 10.0.0.1 (hccn.conf of subnet 100, devices 0-7), and its output."""
    out = tmp_path / "table.json"
    hccn = write_hccn_conf(tmp_path / "hccn.conf", 100)
    return ["generate", "--devices", devices, "--server-ip", "10.0.0.1", "--hccn-conf", str(hccn),
            "--out", str(out), *options], out


def device_entries(table: Path) -> list[tuple[str, str, str]]:
    return [(d["device_id"], d["device_ip"], d["rank_id"]) for d in json.loads(table.read_text())["server_list"][0]["device"]]


@pytest.mark.parametrize(("devices", "ids"), [
    ("0-7", range(8)), ("0-3", range(4)), ("4-7", range(4, 8)), ("6,7", (6, 7)), ("1,3", (1, 3)), ("5", (5,))])
def test_generate_for_910a_takes_one_hccs_group_or_all(devices: str, ids, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    args, out = generate_args(tmp_path, devices, "--chip", "910A")
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    assert [entry[0] for entry in device_entries(out)] == [str(d) for d in ids]


@pytest.mark.parametrize(("devices", "problem"), [
    ("2-5", "devices 2, 3, 4, 5 span both HCCS groups of a 910A server; use devices within 0-3 or within 4-7, "
            "or all 8"),
    ("3,4", "devices 3, 4 span both HCCS groups of a 910A server; use devices within 0-3 or within 4-7, or all 8"),
    ("0-2", "3 devices (0, 1, 2); a 910A server runs 1, 2 or 4 devices of one HCCS group (0-3 or 4-7), or all 8"),
    ("0-5", "6 devices (0, 1, 2, 3, 4, 5); a 910A server runs 1, 2 or 4 devices of one HCCS group (0-3 or 4-7), "
            "or all 8"),
])
def test_generate_for_910a_refuses_what_hccl_refuses(devices: str, problem: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args, out = generate_args(tmp_path, devices, "--chip", "910A")
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [f"server_list[0] (10.0.0.1): {problem}"]
    assert not out.exists()


def test_generate_for_910b_takes_any_devices_and_unnamed_chips_warn(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args, out = generate_args(tmp_path, "2-5", "--chip", "910B")
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    assert [entry[0] for entry in device_entries(out)] == ["2", "3", "4", "5"]
    out.unlink()
    args, out = generate_args(tmp_path, "2-5")  # no --chip: the table, and a warning
    assert main(args) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: server_list[0] (10.0.0.1): devices 2, 3, 4, 5 span both HCCS groups of a 910A server; use devices "
        "within 0-3 or within 4-7, or all 8 (fine on Atlas A2/910B servers; say which with --chip 910A or --chip 910B)"]
    assert [entry[0] for entry in device_entries(out)] == ["2", "3", "4", "5"]


def test_generate_in_a_container_writes_physical_ids_and_their_ips(tmp_path: Path) -> None:
    """A container given physical NPUs 4-7 numbers them 0-3; the table holds the physical ids and the IPs
    hccn.conf lists for them (as hccl_tools.py's --visible_devices)."""
    args, out = generate_args(tmp_path, "0-3", "--visible-devices", "4,5,6,7", "--chip", "910A")
    assert main(args) == 0
    assert device_entries(out) == [("4", "192.168.100.105", "0"), ("5", "192.168.100.106", "1"),
                                   ("6", "192.168.100.107", "2"), ("7", "192.168.100.108", "3")]


@pytest.mark.parametrize(("devices", "visible", "line"), [
    ("0-4", "4,5,6,7", "--devices 4 is not visible: --visible-devices lists 4 device(s), which this container "
                       "numbers 0-3"),
    ("0-3", "2,3,4,5", "server_list[0] (10.0.0.1): devices 2, 3, 4, 5 span both HCCS groups of a 910A server; use "
                       "devices within 0-3 or within 4-7, or all 8"),  # the rule holds for the physical ids
    ("0", "4,4", "bad --visible-devices '4,4': a device is listed twice"),
    ("0", "4-7", "bad --visible-devices '4-7': give physical device ids 0-15 separated by commas, e.g. 4,5,6,7"),
])
def test_generate_in_a_container_refuses_in_one_line(devices: str, visible: str, line: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args, out = generate_args(tmp_path, devices, "--visible-devices", visible, "--chip", "910A")
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not out.exists()


# --- merge ---------------------------------------------------------------------------


def test_merge_renumbers_ranks_in_file_order(tmp_path: Path) -> None:
    first = generate(tmp_path, "10.0.0.1", 100, "0-3")
    second = generate(tmp_path, "10.0.0.2", 101, "4-7")
    merged = tmp_path / "merged.json"
    assert main(["merge", str(second), str(first), "--out", str(merged)]) == 0
    obj = json.loads(merged.read_text())
    assert obj["server_count"] == "2"
    assert [s["server_id"] for s in obj["server_list"]] == ["10.0.0.2", "10.0.0.1"]
    assert [(d["device_id"], d["rank_id"]) for s in obj["server_list"] for d in s["device"]] == [
        ("4", "0"), ("5", "1"), ("6", "2"), ("7", "3"), ("0", "4"), ("1", "5"), ("2", "6"), ("3", "7"),
    ]
    assert validate_table(obj) == []


def test_merge_rejects_same_server_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = generate(tmp_path, "10.0.0.1", 100)
    out = tmp_path / "merged.json"
    assert main(["merge", str(table), str(table), "--out", str(out)]) == 2
    assert "server_id 10.0.0.1 appears in 2 inputs; merge each server once" in capsys.readouterr().err
    assert not out.exists()


def test_examples_are_what_the_tools_produce(tmp_path: Path) -> None:
    """The shipped examples stay in step with generate + merge."""
    first = tmp_path / "first.json"
    hccn = write_hccn_conf(tmp_path / "hccn0.conf", 100)
    assert main(["generate", "--devices", "0-7", "--server-ip", "192.98.92.100",
                 "--hccn-conf", str(hccn), "--out", str(first)]) == 0
    second = generate(tmp_path, "192.98.92.101", 101)
    merged = tmp_path / "merged.json"
    assert main(["merge", str(first), str(second), "--out", str(merged)]) == 0
    assert first.read_text() == (EXAMPLES / "rank_table_1server_8dev.json").read_text()
    assert merged.read_text() == (EXAMPLES / "rank_table_2server_16dev.json").read_text()


# --- validate ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "servers", "ranks"), [
    ("rank_table_1server_8dev.json", 1, 8),
    ("rank_table_2server_16dev.json", 2, 16),
])
def test_examples_validate(name: str, servers: int, ranks: int, capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / name
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK: {servers} server(s), {ranks} rank(s)\n"


def test_validate_for_910a_refuses_what_generate_refuses(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A table made for Atlas A2 servers (2-5 on one, 0-3 on another) is refused for 910A servers only."""
    first = generate(tmp_path, "10.0.0.2", 101, "0,1")
    args, second = generate_args(tmp_path, "2-5", "--chip", "910B")
    assert main(args) == 0
    merged = tmp_path / "merged.json"
    assert main(["merge", str(first), str(second), "--out", str(merged)]) == 0
    assert main(["validate", "--chip", "910B", str(merged)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["validate", "--chip", "910A", str(merged)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{merged}: server_list[1] (10.0.0.1): devices 2, 3, 4, 5 span both HCCS groups of a 910A server; use "
        "devices within 0-3 or within 4-7, or all 8",
        f"{merged}: the servers use 2 or 4 devices; on 910A servers every server must use the same number"]
    assert main(["validate", str(merged)]) == 0  # unnamed chip: warnings
    captured = capsys.readouterr()
    assert [line.split(" (fine on")[0] for line in captured.err.splitlines()] == [
        f"warning: {merged}: server_list[1] (10.0.0.1): devices 2, 3, 4, 5 span both HCCS groups of a 910A server; "
        "use devices within 0-3 or within 4-7, or all 8",
        f"warning: {merged}: the servers use 2 or 4 devices; on 910A servers every server must use the same number"]
    assert captured.out == f"{merged}: OK: 2 server(s), 6 rank(s)\n"
    assert main(["validate", "--chip", "910A", str(EXAMPLES / "rank_table_2server_16dev.json")]) == 0


def test_load_rank_table_returns_dataclasses() -> None:
    table = load_rank_table(EXAMPLES / "rank_table_2server_16dev.json")
    assert table.rank_size == 16
    assert [s.server_id for s in table.servers] == ["192.98.92.100", "192.98.92.101"]
    assert table.servers[1].devices[0] == Device(device_id=0, device_ip="192.168.101.101", rank_id=8)


DELETE = object()
_D = "server_list[1].device[2]"  # device 2 of server 1 (rank 10), the entry most problems break

# name: (entry to break, key, new value or DELETE, line expected after "FILE: ")
PROBLEMS: dict[str, tuple[str, str, object, str]] = {
    "missing_key": ("top", "version", DELETE, "missing key 'version'"),
    "duplicate_rank": ("device", "rank_id", "3",
                       f"rank_id 3 is used more than once: server_list[0].device[3], {_D}"),
    "ranks_not_contiguous": ("device", "rank_id", "42",
                             "rank ids must be exactly 0..15 for 16 devices: missing 10; unexpected 42"),
    "duplicate_device": ("device", "device_id", "1",
                         "server_list[1]: device_id 1 appears 2 times on this server"),
    "device_out_of_range": ("device", "device_id", "16", f"{_D}: device_id 16 is out of range 0-15"),
    "missing_device_ip": ("device", "device_ip", DELETE, f"{_D}: missing key 'device_ip'"),
    "malformed_device_ip": ("device", "device_ip", "192.168.1",
                            f'{_D}: device_ip "192.168.1" is not a dotted IPv4 address'),
    "server_count_mismatch": ("top", "server_count", "3",
                              "server_count is 3 but server_list has 2 server(s)"),
    "server_count_not_string": ("top", "server_count", 2,
                                "server_count must be a JSON string, got number 2"),
    "server_id_not_string": ("server", "server_id", 7,
                             "server_list[1]: server_id must be a JSON string, got number 7"),
    "device_id_not_string": ("device", "device_id", 2,
                             f"{_D}: device_id must be a JSON string, got number 2"),
    "device_ip_not_string": ("device", "device_ip", None, f"{_D}: device_ip must be a JSON string, got null"),
    "rank_id_not_string": ("device", "rank_id", 10, f"{_D}: rank_id must be a JSON string, got number 10"),
    "status": ("top", "status", "initializing", 'status must be "completed", got "initializing"'),
    "server_id_not_ipv4": ("server", "server_id", "node-1",
                           'server_list[1]: server_id "node-1" is not a dotted IPv4 address'),
}


def broken_table(tmp_path: Path, *names: str) -> Path:
    """The 2-server example with the named PROBLEMS applied, written to a file."""
    obj = json.loads((EXAMPLES / "rank_table_2server_16dev.json").read_text())
    for name in names:
        entry, key, value, _ = PROBLEMS[name]
        server = obj["server_list"][1]
        node = {"top": obj, "server": server, "device": server["device"][2]}[entry]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    path = tmp_path / "table.json"
    path.write_text(json.dumps(obj))
    return path


def expected_lines(path: Path, *names: str) -> list[str]:
    return sorted(f"{path}: {PROBLEMS[name][3]}" for name in names)


def run_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.err.splitlines() + captured.out.splitlines()


@pytest.mark.parametrize("problem", PROBLEMS)
def test_validate_reports_each_problem(problem: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = broken_table(tmp_path, problem)
    code, lines = run_validate(path, capsys)
    assert code != 0
    assert expected_lines(path, problem)[0] in lines


def test_validate_reports_all_problems_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chosen = ("status", "malformed_device_ip", "server_count_mismatch", "rank_id_not_string",
              "server_id_not_ipv4")
    path = broken_table(tmp_path, *chosen)
    code, lines = run_validate(path, capsys)
    assert code != 0
    assert sorted(lines) == expected_lines(path, *chosen)


def test_load_rank_table_raises_with_every_problem(tmp_path: Path) -> None:
    path = broken_table(tmp_path, "status", "duplicate_device")
    with pytest.raises(RankTableError) as info:
        load_rank_table(path)
    assert sorted(str(info.value).splitlines()) == expected_lines(path, "status", "duplicate_device")


@pytest.mark.parametrize(("content", "expected"), [
    (b'{\n  "version": "1.0",\n  "server_count" "1"\n}',
     "invalid JSON: Expecting ':' delimiter at line 3 column 18"),
    (b"[]", "top level must be a JSON object, got array"),
    (b'{"version": "\xff"}', "not UTF-8 text (byte 13)"),
])
def test_validate_reports_unreadable_tables(content: bytes, expected: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "table.json"
    path.write_bytes(content)
    code, lines = run_validate(path, capsys)
    assert code != 0
    assert lines == [f"{path}: {expected}"]


def test_local_ranks_lists_one_server(capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "rank_table_2server_16dev.json"
    assert main(["local-ranks", str(path), "--server-index", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "rank_size 16", "server_count 2", "server_id 192.98.92.101",
        *(f"device {d} {d + 8} {d}" for d in range(8)),  # physical id, rank, the id the worker is given
    ]
    assert main(["local-ranks", str(path), "--server-index", "2"]) == 2
    assert "--server-index 2 out of range" in capsys.readouterr().err


def test_local_ranks_gives_the_containers_device_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = generate(tmp_path, "10.0.0.1", 100, "4-7")
    assert main(["local-ranks", str(table), "--visible-devices", "4,5,6,7"]) == 0
    assert capsys.readouterr().out.splitlines()[3:] == ["device 4 0 0", "device 5 1 1", "device 6 2 2", "device 7 3 3"]
    assert main(["local-ranks", str(table), "--visible-devices", "5,6,7"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{table}: device 4 of server 0 (10.0.0.1) is not among --visible-devices 5,6,7; list every physical device "
        "this container was given, in its order"]


# --- detection of a rank-table start (bootstrap) --------------------------------------------


@pytest.fixture()
def crossed_table(tmp_path: Path) -> Path:
    """Server 10.0.0.2 with devices 4-7 (ranks 0-3), then 10.0.0.1 with devices 0-3 (ranks 4-7): each device id
    on one server only, and no rank equal to its device."""
    second = generate(tmp_path, "10.0.0.2", 101, "4-7")
    first = generate(tmp_path, "10.0.0.1", 100, "0-3")
    merged = tmp_path / "crossed.json"
    assert main(["merge", str(second), str(first), "--out", str(merged)]) == 0
    return merged


# The placement a process of a user's own start script gets, in a process of its own with only the given
# variables (and this tree on the path).
DETECT = ("import os; from vit_dist.bootstrap import detect_placement; p = detect_placement(os.environ); "
          "print(p.launcher, p.rank, p.world_size, p.local_rank, p.local_world_size)")


def detect(**env: str) -> subprocess.CompletedProcess[str]:
    return run([PYTHON, "-c", DETECT], timeout=60, env={"PYTHONPATH": str(ROOT), **env})


@pytest.mark.parametrize(("variables", "placement"), [
    ({"RANK_TABLE_FILE": "T", "DEVICE_ID": "5"}, "rank_table 1 8 5 4"),  # no RANK_SIZE, no RANK_ID
    ({"RANK_TABLE_FILE": "T", "DEVICE_ID": "2", "RANK_SIZE": "8"}, "rank_table 6 8 2 4"),
    ({"RANK_TABLE_FILE": "T", "RANK_ID": "6"}, "rank_table 6 8 2 4"),  # DEVICE_ID: the table's for rank 6
    ({"MINDSPORE_HCCL_CONFIG_PATH": "T", "DEVICE_ID": "7", "LOCAL_WORLD_SIZE": "1"}, "rank_table 3 8 7 1"),
    ({"RANK_TABLE_FILE": "T", "RANK_ID": "0", "DEVICE_ID": "0"}, "rank_table 0 8 0 4"),  # a container's DEVICE_ID
])
def test_a_rank_table_start_is_detected_without_rank_size(variables: dict, placement: str,
                                                          crossed_table: Path) -> None:
    result = detect(**{name: str(crossed_table) if value == "T" else value for name, value in variables.items()})
    assert (result.returncode, result.stdout, result.stderr) == (0, placement + "\n", "")


@pytest.mark.parametrize(("variables", "line"), [
    ({"DEVICE_ID": "9"}, "DEVICE_ID=9 is on no server of rank table <T>, so this process's rank is unknown; set "
                         "RANK_ID to its rank_id in the table"),
    ({}, "rank table <T> is set but neither RANK_ID nor DEVICE_ID is: set RANK_ID to this process's rank_id in the "
         "table, and DEVICE_ID to its device"),
    ({"DEVICE_ID": "2", "RANK_SIZE": "16"}, "RANK_SIZE=16 but rank table <T> has 8 device(s); set RANK_SIZE=8 or "
                                            "unset it"),
    ({"RANK_ID": "8"}, "RANK_ID=8 is not a rank of rank table <T> (ranks 0-7); set RANK_ID to this process's rank_id "
                       "in the table"),
    ({"RANK_ID": "-1"}, "RANK_ID='-1' is not a whole number; set it to one, or unset it"),
])
def test_a_rank_table_start_that_cannot_be_placed_stops_in_one_line(variables: dict, line: str, crossed_table: Path,
                                                                    tmp_path: Path) -> None:
    """Through the CLI, before anything starts: one line, exit status 2."""
    config = tiny_config(tmp_path / "tiny.yaml", tmp_path / "no_data")
    result = run([PYTHON, "-m", "vit_dist", "train", str(config)], timeout=60,
                 env={"PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "RANK_TABLE_FILE": str(crossed_table),
                      **variables})
    assert (result.returncode, result.stderr.splitlines()) == (2, ["error: " + line.replace("<T>", str(crossed_table))])


def test_a_device_on_several_servers_needs_rank_id() -> None:
    table = EXAMPLES / "rank_table_2server_16dev.json"
    result = detect(RANK_TABLE_FILE=str(table), DEVICE_ID="1")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"vit_dist.host.errors.ConfigError: DEVICE_ID=1 is on 2 servers of rank table {table}, so this process's "
        "rank is unknown; set RANK_ID to its rank_id in the table")
    assert detect(RANK_TABLE_FILE=str(table), DEVICE_ID="1", RANK_ID="9").stdout == "rank_table 9 16 1 8\n"


def test_the_backend_start_exports_the_placement_hccl_reads(tmp_path: Path) -> None:
    """MindSpore's HCCL start reads RANK_ID and RANK_SIZE itself: what vit-dist derived must be in the
    environment by then, RANK_ID derived from DEVICE_ID here (shown on one device, where init_backend brings
    up no collective)."""
    args, table = generate_args(tmp_path, "3")
    assert main(args) == 0
    script = ("import os; from vit_dist import bootstrap; p = bootstrap.detect_placement(os.environ); "
              "bootstrap.init_backend('CPU', 1, p); "
              "print(os.environ['RANK_ID'], os.environ['RANK_SIZE'], os.environ['DEVICE_ID'])")
    result = run([PYTHON, "-c", script], timeout=120,
                 env={"PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "RANK_TABLE_FILE": str(table), "DEVICE_ID": "3"})
    assert (result.returncode, result.stdout.splitlines()[-1:]) == (0, ["0 1 3"]), result.stderr


def test_an_invalid_rank_table_is_one_line(tmp_path: Path) -> None:
    path = broken_table(tmp_path, "duplicate_rank", "status")
    result = detect(RANK_TABLE_FILE=str(path), RANK_ID="0")
    assert result.stderr.splitlines()[-1] == (
        f"vit_dist.host.errors.ConfigError: rank table {path}: status must be \"completed\", got \"initializing\" "
        f"(and 2 more problem(s)); check it with vit-dist rank-table validate {path}")


# --- launcher ------------------------------------------------------------------------


def launcher_env(**extra: str) -> dict:
    """tool_env with this tree's package first on PYTHONPATH, for launchers run from a copy of launch/."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**tool_env(PYTHONPATH=path), **extra}  # after tool_env, which drops MS_ROLE


def run_launcher(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return run(["bash", str(LAUNCHER), *args], cwd=cwd, timeout=120, env=launcher_env())


def test_launcher_dry_run_second_server(two_server_table: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    relative_table = os.path.relpath(two_server_table, cwd)  # the launcher must make it absolute
    result = run_launcher("--server-index", "1", "--dry-run", relative_table, "cfg.yaml",
                          "--set", "train.lr=1e-3", cwd=cwd)
    assert result.returncode == 0, result.stderr
    rank_lines = [line for line in result.stdout.splitlines() if line.startswith("DEVICE_ID=")]
    assert len(rank_lines) == 8
    table = str(two_server_table.resolve())
    for device, line in enumerate(rank_lines):
        assert line == (
            f"DEVICE_ID={device} RANK_ID={device + 8} RANK_SIZE=16 RANK_TABLE_FILE={table} "
            f"MINDSPORE_HCCL_CONFIG_PATH={table} LOCAL_WORLD_SIZE=8 {PYTHON} {ROOT}/launch/worker.py train cfg.yaml "
            f"--set train.lr=1e-3 --set train.output_dir=RUN_DIR >RUN_DIR/logs/worker_{device + 8}.log 2>&1"
        )
    for line in ("launcher        rank_table", "world size      16",
                 "nodes           2; this is server 1 (10.0.0.2)", "run directory   RUN_DIR"):
        assert line in result.stdout
    assert list(cwd.iterdir()) == []  # a dry run creates nothing, not even a run directory


def test_launcher_dry_run_in_a_container_inside_an_outer_job(tmp_path: Path) -> None:
    """A container given physical NPUs 4-7 (the table's ids) sees them as 0-3: DEVICE_ID is the container's;
    another launcher's variables are removed from each worker's environment."""
    table = generate(tmp_path, "10.0.0.1", 100, "4-7")
    env = launcher_env(MS_ROLE="MS_WORKER", MS_WORKER_NUM="8", OMPI_COMM_WORLD_SIZE="8", PRTE_LAUNCHED="1")
    result = run(["bash", str(LAUNCHER), "--dry-run", "--visible-devices", "4,5,6,7", str(table), "cfg.yaml"],
                 cwd=tmp_path, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "  local devices   4 5 6 7 (ranks 0 1 2 3); DEVICE_ID 0 1 2 3 in this container\n" in result.stdout
    assert ("  environment     MS_ROLE MS_WORKER_NUM OMPI_COMM_WORLD_SIZE PRTE_LAUNCHED (another launcher's, removed "
            "for the workers)\n") in result.stdout
    rank_lines = [line for line in result.stdout.splitlines() if line.startswith("env ")]
    assert [line.split(f" RANK_SIZE=4 RANK_TABLE_FILE={table} ")[0] for line in rank_lines] == [
        f"env -u MS_ROLE -u MS_WORKER_NUM -u OMPI_COMM_WORLD_SIZE -u PRTE_LAUNCHED DEVICE_ID={rank} RANK_ID={rank}"
        for rank in range(4)]
    shown = subprocess.run(["bash", "-c", rank_lines[0].split(f" {PYTHON} ")[0] + " env"], env=env,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert "DEVICE_ID=0" in shown and not [line for line in shown if line.startswith(("MS_", "OMPI_", "PRTE_"))]


def test_launcher_applies_the_chip_rule_it_is_given(tmp_path: Path) -> None:
    args, table = generate_args(tmp_path, "2-5", "--chip", "910B")
    assert main(args) == 0
    assert run_launcher("--dry-run", "--chip", "910B", str(table), "cfg.yaml").returncode == 0
    result = run_launcher("--dry-run", "--chip", "910A", str(table), "cfg.yaml")
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        f"{table}: server_list[0] (10.0.0.1): devices 2, 3, 4, 5 span both HCCS groups of a 910A server; use "
        "devices within 0-3 or within 4-7, or all 8",
        f"error: invalid rank table {table}; fix the problems above, or make it anew (vit-dist rank-table generate)"])
    result = run_launcher("--dry-run", "--chip", "910", str(table), "cfg.yaml")
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        "error: --chip is 910A (Atlas training series) or 910B (Atlas A2 and later), got '910'"])


@pytest.mark.parametrize("job", [["train"], ["eval", "--ckpt", "c.safetensors"], ["bench", "--steps", "3"]])
def test_launcher_gives_the_workers_the_subcommand(job: list[str]) -> None:
    subcommand, *options = job
    result = run_launcher("--dry-run", str(EXAMPLES / "rank_table_1server_8dev.json"), subcommand, "cfg.yaml",
                          *options)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"vit-dist {subcommand}"
    worker = f"{ROOT}/launch/worker.py "
    commands = [line.split(worker)[1] for line in result.stdout.splitlines() if worker in line]
    assert commands == [" ".join([subcommand, "cfg.yaml", *options, "--set", "train.output_dir=RUN_DIR",
                                  f">RUN_DIR/logs/worker_{rank}.log", "2>&1"]) for rank in range(8)]


def test_launcher_aborts_on_invalid_table(tmp_path: Path) -> None:
    path = broken_table(tmp_path, "duplicate_rank")
    result = run_launcher("--dry-run", str(path), "cfg.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"error: invalid rank table {path}; fix the problems above")
    assert "rank_id 3 is used more than once" in result.stderr
    assert "DEVICE_ID=" not in result.stdout


def test_launcher_refuses_a_server_index_past_the_table() -> None:
    table = EXAMPLES / "rank_table_2server_16dev.json"
    result = run_launcher("--server-index", "2", "--dry-run", str(table), "cfg.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{table}: --server-index 2 out of range; the table has 2 server(s) (0..1)"]


# A stand-in for launch/worker.py (the real one needs Ascend): it says where it would write, where the
# bootstrap layer places it and which launchers' variables it sees, then, as STANDIN says, succeeds,
# sleeps, or fails as rank 1 while the other ranks sleep.
STANDIN_WORKER = """\
import os, sys, time
from vit_dist.bootstrap import detect_placement
print("rank", os.environ["RANK_ID"], "args", sys.argv[1:], flush=True)
p = detect_placement(os.environ)
print("placement", p.launcher, p.rank, p.world_size, p.local_rank, p.local_world_size, flush=True)
print("foreign", sorted(k for k in os.environ if k.startswith(("MS_", "OMPI_", "PMIX_", "PRTE_", "VIT_DIST_"))
                        and k != "VIT_DIST_JOB"), flush=True)
if os.environ["STANDIN"] == "fail" and os.environ["RANK_ID"] == "1":
    print("simulated failure", flush=True)
    sys.exit(3)
if os.environ["STANDIN"] != "succeed":
    time.sleep(60)
"""


class Standin:
    """A copy of launch/ with the stand-in worker, in `folder`, with a 4-device table and a tiny real config
    whose run directory is unset (so pre-flight picks one under folder/runs)."""

    def __init__(self, folder: Path, data: Path) -> None:
        shutil.copytree(ROOT / "launch", folder / "launch")
        (folder / "launch" / "worker.py").write_text(STANDIN_WORKER)
        self.folder = folder
        self.table = generate(folder, "10.0.0.1", 100, "0-3")
        self.config = tiny_config(folder / "tiny.yaml", data)

    def command(self, *args: str) -> list[str]:
        return ["bash", str(self.folder / "launch" / "rank_table.sh"), str(self.table), str(self.config), *args]

    def run(self, mode: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run(self.command(*args), cwd=self.folder, timeout=120, env=launcher_env(STANDIN=mode, **env))

    def workers(self) -> list[int]:
        found = subprocess.run(["pgrep", "-f", str(self.folder / "launch" / "worker.py")], capture_output=True,
                               text=True).stdout.split()
        return [int(pid) for pid in found]


@pytest.fixture()
def standin(tmp_path: Path, tiny_data: Path):
    """The stand-in job; afterwards, none of its workers may be left running."""
    job = Standin(tmp_path, tiny_data)
    yield job
    leftovers = job.workers()
    for pid in leftovers:  # a failing test leaves no sleepers behind
        os.kill(pid, signal.SIGKILL)
    assert leftovers == []


def _run_dir(stdout: str) -> Path:
    return Path(re.search(r"^  run directory   (.+)$", stdout, re.MULTILINE)[1])


# What an outer msrun or mpirun job leaves in the environment: a worker that inherited it would take
# that launcher's path (placement msrun, world 8).
OUTER_JOB = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "8", "MS_SCHED_HOST": "10.9.9.9", "MS_SCHED_PORT": "8118",
             "MS_NODE_ID": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5", "PMIX_RANK": "5",
             "VIT_DIST_NODE_RANK": "1"}


def test_launcher_workers_share_one_run_directory(standin: Standin) -> None:
    """Started inside an outer job, the workers see none of its variables, and are placed by the table."""
    result = standin.run("succeed", **OUTER_JOB)
    assert result.returncode == 0, result.stderr
    run_dir = _run_dir(result.stdout)
    runs = standin.folder / "runs"
    assert run_dir.parent == runs and [p.name for p in runs.iterdir()] == [run_dir.name]
    assert f"  environment     {' '.join(sorted(OUTER_JOB))} (another launcher's, removed for the workers)\n" \
        in result.stdout
    for rank in range(4):
        log = (run_dir / "logs" / f"worker_{rank}.log").read_text()
        assert log == (f"rank {rank} args ['train', '{standin.config}', '--set', 'train.output_dir={run_dir}', "
                       "'parallel.device_target=CPU']\n"  # the device as the pre-flight resolved it
                       f"placement rank_table {rank} 4 {rank} 4\n"
                       "foreign []\n")
    assert "rank 0 args" in result.stdout  # the first local worker on the console
    assert result.stdout.splitlines()[-1] == f"all 4 workers of server 0 finished; logs in {run_dir}/logs"


def test_launcher_across_servers_needs_a_shared_output_dir(standin: Standin, two_server_table: Path) -> None:
    """Each server's launcher would pick a run directory of its own: the job must name the shared one."""
    result = run(["bash", str(standin.folder / "launch" / "rank_table.sh"), "--server-index", "1",
                  str(two_server_table), str(standin.config)], cwd=standin.folder, timeout=120,
                 env=launcher_env(STANDIN="succeed"))
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        "error: a job across 2 nodes needs train.output_dir: each node's launcher would make a run directory of its "
        "own; set it to a directory every node shares"])
    assert not (standin.folder / "runs").exists()


def test_launcher_stops_everyone_when_a_worker_fails(standin: Standin) -> None:
    result = standin.run("fail")
    assert result.returncode == 3
    log = _run_dir(result.stdout) / "logs" / "worker_1.log"
    assert (f"error: rank 1 (device 1) exited with status 3, so the job was stopped (status 3); last lines of {log}:"
            in result.stderr)
    assert result.stderr.rstrip().endswith("simulated failure")  # the end of the failed rank's log


def test_launcher_preflight_refuses_a_bad_config_in_one_line(standin: Standin) -> None:
    result = standin.run("succeed", "--set", "train.epoch=3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {standin.config}: unknown key 'train.epoch' (did you mean 'train.epochs'?)"]
    assert "rank 0 args" not in result.stdout  # no worker started
    assert not (standin.folder / "runs").exists()


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_launcher_stops_every_worker_on_a_signal(standin: Standin, sig: signal.Signals, status: int) -> None:
    # SIGINT at its default, as a shell at a terminal starts a command: a suite started in the background
    # by a script (`cmd &`) ignores SIGINT, and a shell started with a signal ignored can never trap it.
    launcher = subprocess.Popen(["env", "--default-signal=INT", *standin.command()], cwd=standin.folder,
                                env=launcher_env(STANDIN="sleep"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(standin.workers()) < 4:
            assert launcher.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        launcher.send_signal(sig)  # to the launcher alone: it must pass it on
        _, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == status
    assert "stopping the workers" in err
