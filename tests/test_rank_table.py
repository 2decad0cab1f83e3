"""HCCL rank-table tooling: generator, merger, validator and the launcher's dry run.

HCCL cannot run here, so the launcher is exercised with --dry-run and with a stand-in worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert main(["generate", "--devices", "0-5", "--server-ip", "10.1.1.1", "--hccn-conf", str(hccn)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{hccn}: no address_4= line for device 4", f"{hccn}: no address_5= line for device 5"]


@pytest.mark.skipif(Path("/etc/hccn.conf").exists(), reason="this host has a real /etc/hccn.conf")
def test_generate_without_hccn_conf_explains_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--devices", "0-7", "--server-ip", "10.1.1.1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "/etc/hccn.conf not found" in err[0] and "--hccn-conf" in err[0]


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
    assert main(["merge", str(table), str(table), "--out", str(out)]) == 1
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
        *(f"device {d} {d + 8}" for d in range(8)),
    ]
    assert main(["local-ranks", str(path), "--server-index", "2"]) == 1
    assert "--server-index 2 out of range" in capsys.readouterr().err


# --- launcher ------------------------------------------------------------------------


def run_launcher(script: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})


def test_launcher_dry_run_second_server(two_server_table: Path) -> None:
    log_dir = two_server_table.parent / "logs"
    relative_table = os.path.relpath(two_server_table, ROOT)  # the launcher must make it absolute
    result = run_launcher(LAUNCHER, relative_table, "cfg.yaml", "--server-index", "1", "--dry-run",
                          "--log-dir", str(log_dir), "--set", "train.lr=1e-3")
    assert result.returncode == 0, result.stderr
    rank_lines = [line for line in result.stdout.splitlines() if line.startswith("DEVICE_ID=")]
    assert len(rank_lines) == 8
    table = str(two_server_table.resolve())
    for device, line in enumerate(rank_lines):
        assert line == (
            f"DEVICE_ID={device} RANK_ID={device + 8} RANK_SIZE=16 RANK_TABLE_FILE={table} "
            f"MINDSPORE_HCCL_CONFIG_PATH={table} {sys.executable} {ROOT}/launch/worker.py train cfg.yaml "
            f"--set train.lr=1e-3 >{log_dir}/rank_{device + 8}.log 2>&1"
        )
    assert "world size     16" in result.stdout
    assert not log_dir.exists()  # a dry run creates nothing


def test_launcher_aborts_on_invalid_table(tmp_path: Path) -> None:
    path = broken_table(tmp_path, "duplicate_rank")
    result = run_launcher(LAUNCHER, str(path), "cfg.yaml", "--dry-run")
    assert result.returncode != 0
    assert f"rank_table.sh: invalid rank table: {path}" in result.stderr
    assert "rank_id 3 is used more than once" in result.stderr
    assert "DEVICE_ID=" not in result.stdout


FAKE_WORKER = """\
import os, sys, time
print("rank", os.environ["RANK_ID"], "args", sys.argv[1:], flush=True)
if os.environ["RANK_ID"] == "1":
    print("simulated failure", flush=True)
    sys.exit(3)
time.sleep(30)
"""


def test_launcher_stops_everyone_when_a_worker_fails(tmp_path: Path) -> None:
    """Stand-in worker (real one needs Ascend): rank 1 fails, the sleeping ranks must be killed."""
    (tmp_path / "launch").mkdir()
    (tmp_path / "vit_dist").mkdir()
    shutil.copy(LAUNCHER, tmp_path / "launch")
    shutil.copy(ROOT / "vit_dist" / "rank_table.py", tmp_path / "vit_dist")
    (tmp_path / "launch" / "worker.py").write_text(FAKE_WORKER)
    table = generate(tmp_path, "10.0.0.1", 100, "0-3")
    result = run_launcher(tmp_path / "launch" / "rank_table.sh", str(table), "cfg.yaml", "--log-dir", "logs",
                          cwd=tmp_path)
    assert result.returncode == 3
    assert "rank 1 (device 1) failed with status 3" in result.stderr
    assert "simulated failure" in result.stderr  # tail of the failed rank's log
    assert (tmp_path / "logs" / "rank_0.log").read_text() == "rank 0 args ['train', 'cfg.yaml']\n"
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "launch" / "worker.py")],
                               capture_output=True, text=True).stdout.split()
    for pid in leftovers:  # don't leave sleepers behind when this test fails
        os.kill(int(pid), signal.SIGKILL)
    assert leftovers == []
