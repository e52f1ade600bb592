#!/usr/bin/env bash
# Per-write cost of each tandem daemon (issue 11, point 5): syscalls, context switches
# (= wake-ups), futex calls, heap allocations and CPU time per 4 KiB protocol-C write,
# on the Primary (alpha, NBD export) and on the Secondary (beta), at QD1 and QD32.
#
# Sets up a pair as the e2e runner does (bench/src/e2e.rs, start_cluster), warms it up,
# then runs fio's nbd engine for --ios writes while `perf stat -p` counts on each daemon
# (all threads), and divides by the writes fio completed. Allocations are uprobes on
# glibc's allocation entry points (tandem uses Rust's System allocator, i.e. glibc);
# probes it creates are deleted at exit. Also prints the idle background rate (the same
# counters over 2 s with no IO, per second). Needs root (perf, uprobes), fio, python3.
#
# usage: bench/per-write-cost.sh [--tandem PATH] [--ios N] [--work DIR] [--by-syscall] [--no-fill]
#   --no-fill      keep the backing files sparse (by default the volume is filled first
#                  with 1 MiB sequential writes, as the e2e runner does: on a sparse file
#                  every first write allocates, and io_uring hands it to a kernel worker).
#   --by-syscall   also count syscalls by name in a QD1 run (the ~40 that a data path can
#                  use; "other" is the rest of raw_syscalls) and print them per daemon.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tandem=$repo/target/release/tandem
ios=20000
work=
by_syscall=0
fill=1
libc_so=/lib/x86_64-linux-gnu/libc.so.6
alloc_fns=(malloc calloc realloc posix_memalign aligned_alloc memalign)
# Named for --by-syscall. Not syscalls:sys_enter_* (~350 events): opening them on every
# thread takes long enough that an io_uring worker thread exits meanwhile (ESRCH).
by_name=(read write readv writev recvfrom sendto sendmsg recvmsg recvmmsg sendmmsg
    io_uring_enter epoll_wait epoll_pwait epoll_pwait2 epoll_ctl futex eventfd2 poll ppoll
    pread64 pwrite64 preadv pwritev preadv2 pwritev2 fdatasync fsync sync_file_range
    clock_nanosleep nanosleep mmap munmap mprotect madvise brk sched_yield getrandom ioctl
    accept4 statx rt_sigprocmask)

start=$SECONDS
log() { echo "per-write-cost: [$((SECONDS - start)) s] $*" >&2; }
die() {
    echo "per-write-cost: $*" >&2
    exit 1
}

while (($#)); do
    case $1 in
    --tandem) tandem=${2:?--tandem PATH}; shift 2 ;;
    --ios) ios=${2:?--ios N}; shift 2 ;;
    --work) work=${2:?--work DIR}; shift 2 ;;
    --by-syscall) by_syscall=1; shift ;;
    --no-fill) fill=0; shift ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ -x $tandem ]] || die "no tandem binary at $tandem (give --tandem PATH)"
if ! [[ $ios =~ ^[0-9]+$ ]] || ((ios == 0)); then
    die "--ios wants a positive integer"
fi
py=/usr/bin/python3 # not a pyenv shim: it is started ~60 times
[[ -x $py ]] || py=python3
for t in fio perf "$py" truncate; do
    command -v "$t" >/dev/null || die "$t is not installed"
done
((EUID == 0)) || die "needs root (perf stat -p on the daemons, uprobes on libc)"

own_work=0
if [[ -z $work ]]; then
    work=$(mktemp -d /var/tmp/tandem-cost.XXXXXX)
    own_work=1
fi
mkdir -p "$work"
work=$(cd "$work" && pwd)

pids=()
created_probes=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    for p in "${created_probes[@]}"; do
        perf probe -q -d "probe_libc:$p" 2>/dev/null || true
    done
    if ((own_work)); then
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One request on a tandem management socket (newline-delimited JSON). Prints the value
# at the dotted path $3 of the reply (e.g. status.disk), or the whole reply.
mgmt() {
    "$py" - "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    d = s.recv(65536)
    if not d:
        break
    buf += d
v = json.loads(buf)
if len(sys.argv) > 3:
    for k in sys.argv[3].split("."):
        v = v.get(k) if isinstance(v, dict) else None
    print(v if isinstance(v, str) else json.dumps(v))
else:
    print(json.dumps(v))
EOF
}

# Waits up to $2 seconds for the command "${@:3}" to succeed; fails with message $1.
wait_for() {
    local what=$1 secs=$2 i
    shift 2
    for ((i = 0; i < secs * 10; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        for p in "${pids[@]}"; do
            kill -0 "$p" 2>/dev/null ||
                die "a daemon exited while waiting for $what (logs in $work)"
        done
        sleep 0.1
    done
    die "timed out waiting for $what"
}
connected() { [[ $(mgmt "$alpha_mgmt" '{"cmd":"status"}' status.connection) == Connected ]]; }
both_uptodate() {
    [[ $(mgmt "$alpha_mgmt" '{"cmd":"status"}' status.disk) == UpToDate ]] &&
        [[ $(mgmt "$beta_mgmt" '{"cmd":"status"}' status.disk) == UpToDate ]]
}
mgmt_ok() {
    local r
    r=$(mgmt "$@")
    [[ $("$py" -c 'import json,sys; print(json.loads(sys.argv[1]).get("ok"))' "$r") == True ]] ||
        die "mgmt $2 refused: $r"
}

# --- uprobes on glibc's allocators ---------------------------------------------------
# Each uprobe hit is a trap (several µs here), so the allocation counts come from a run of
# their own: the other counters, CPU time and fio's numbers come from a run without them.
alloc_events=()
existing=$(perf probe -l 2>/dev/null || true)
for f in "${alloc_fns[@]}"; do
    if ! grep -q "probe_libc:$f " <<<"$existing"; then
        if perf probe -q -x "$libc_so" --add "$f" >/dev/null 2>&1; then
            created_probes+=("$f")
        else
            continue
        fi
    fi
    alloc_events+=("probe_libc:$f")
done
((${#alloc_events[@]})) || die "no uprobe on glibc's allocators could be created"
alloc_list=$(IFS=,; echo "${alloc_events[*]}")
# Wake-ups: switches away from a thread that blocks (state S or D); each ends in a
# wake-up. The rest of context-switches are preemptions (other load on the CPUs).
base_list=raw_syscalls:sys_enter,context-switches,syscalls:sys_enter_futex,task-clock
base_ev=(-e "$base_list" -e sched:sched_switch --filter 'prev_state & 3')

# --- the pair ------------------------------------------------------------------------
# 1 GiB data area + 4 MiB for tandem's metadata (as e2e.rs MD_ROOM), so fio's 1 GiB fits.
al_extents=1237 # e2e.rs DEFAULT_AL
for n in alpha beta; do
    truncate -s $(((1 << 30) + (4 << 20))) "$work/$n.img"
done
for n in 0:alpha 1:beta; do
    "$tandem" create-md --force --node-id="${n%%:*}" --al-extents=$al_extents \
        "$work/${n#*:}.img" >>"$work/create-md.log" 2>&1
done
read -r port_a port_b < <("$py" -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))')
alpha_mgmt=$work/alpha.sock
beta_mgmt=$work/beta.sock
nbd=$work/tandem.nbd
cat >"$work/tandem.toml" <<EOF
[resource]
name = "bench"
protocol = "C"

[net]
connect-int = 1

[disk]
al-extents = $al_extents

[[node]]
name = "alpha"
address = "127.0.0.1:$port_a"
disk = "$work/alpha.img"
nbd-socket = "$nbd"
mgmt-socket = "$alpha_mgmt"

[[node]]
name = "beta"
address = "127.0.0.1:$port_b"
disk = "$work/beta.img"
mgmt-socket = "$beta_mgmt"
EOF
log "starting the pair in $work"
for n in alpha beta; do
    "$tandem" up --config "$work/tandem.toml" --node "$n" >"$work/$n.log" 2>&1 &
    pids+=($!)
done
alpha_pid=${pids[0]}
beta_pid=${pids[1]}
wait_for "the pair to connect" 60 connected
mgmt_ok "$alpha_mgmt" '{"cmd":"new-current-uuid","clear-bitmap":true}'
wait_for "both disks UpToDate" 60 both_uptodate
mgmt_ok "$alpha_mgmt" '{"cmd":"primary"}'
wait_for "the NBD socket" 30 test -S "$nbd"

run_fio() { # iodepth number_ios output.json
    fio --ioengine=nbd --uri="nbd+unix:///?socket=$nbd" --rw=randwrite --bs=4k --direct=1 \
        --number_ios="$2" --size=1G --iodepth="$1" --randrepeat=0 --time_based=0 \
        --name=cost --output-format=json --output="$3" >/dev/null
}

# Warm-up: touches every 4 MiB activity-log extent of the 1 GiB (256 of 1237 slots) and
# lets the daemons reach their steady buffers and threads.
if ((fill)); then
    log "fill: 1 MiB sequential writes over the 1 GiB"
    fio --ioengine=nbd --uri="nbd+unix:///?socket=$nbd" --rw=write --bs=1m --iodepth=8 \
        --direct=1 --size=1G --refill_buffers=1 --name=fill --output="$work/fill.txt" >/dev/null
fi
log "warm-up"
run_fio 32 5000 "$work/warmup.json"
run_fio 1 1000 "$work/warmup1.json"

# perf stat on both daemons around "$@"; counts in $work/perf-$tag-{alpha,beta}.csv.
# The perf arguments (-e ...) are in the array perf_ev.
measure() { # tag cmd...
    local tag=$1 pa pb
    shift
    perf stat -x, -o "$work/perf-$tag-alpha.csv" "${perf_ev[@]}" -p "$alpha_pid" &
    pa=$!
    perf stat -x, -o "$work/perf-$tag-beta.csv" "${perf_ev[@]}" -p "$beta_pid" &
    pb=$!
    sleep 0.5 # perf attaches to every thread before the IO starts
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    kill -INT "$pa" "$pb" 2>/dev/null || true
    wait "$pa" "$pb" || true
    window=$("$py" -c "print(f'{$t1 - $t0 + 0.5:.2f}')")
}

# Sum of the counters in a perf -x, file: prints "name value" per event (allocs summed).
counts() {
    "$py" - "$1" <<'EOF'
import sys
c = {}
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) < 3 or line.startswith("#"):
        continue
    try:
        v = float(f[0])
    except ValueError:
        v = float("nan")  # <not counted>
    name = f[2]
    key = "alloc" if name.startswith("probe_libc:") else name
    c[key] = c.get(key, 0) + v
for k, v in c.items():
    print(k, v)
EOF
}

# Writes fio completed, from its JSON output $1.
total_ios() {
    "$py" -c '
import json, sys
print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["total_ios"])' "$1"
}

# utime + stime of every thread of process $1, in clock ticks (/proc/PID/stat 14, 15).
cpu_ticks() {
    "$py" -c '
import sys
f = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()
print(int(f[11]) + int(f[12]))' "$1"
}

# Per QD: a run with no perf attached (fio's IOPS and latency, CPU time from /proc), a run
# under the syscall and scheduler tracepoints, a run under the allocator uprobes.
declare -A result
hz=$(getconf CLK_TCK)
for qd in 1 32; do
    log "QD$qd: fio alone"
    a0=$(cpu_ticks "$alpha_pid")
    b0=$(cpu_ticks "$beta_pid")
    run_fio "$qd" "$ios" "$work/fio-clean-qd$qd.json"
    a1=$(cpu_ticks "$alpha_pid")
    b1=$(cpu_ticks "$beta_pid")
    read -r total iops lat < <("$py" -c '
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print(w["total_ios"], round(w["iops"]), round(w["lat_ns"]["mean"] / 1000, 1))' \
        "$work/fio-clean-qd$qd.json")
    ((total > 0)) || die "fio completed no writes at QD$qd"
    result[clean-qd$qd]="$iops $lat $(((a1 - a0) * 1000000 / hz / total))"
    result[clean-qd$qd]+=" $(((b1 - b0) * 1000000 / hz / total))"

    log "QD$qd: syscalls, switches, futex"
    perf_ev=("${base_ev[@]}")
    measure "qd$qd" run_fio "$qd" "$ios" "$work/fio-qd$qd.json"
    total=$(total_ios "$work/fio-qd$qd.json")
    ((total > 0)) || die "fio completed no writes at QD$qd"
    result[qd$qd]="$total $window"
    log "QD$qd: allocations"
    perf_ev=(-e "$alloc_list")
    measure "alloc-qd$qd" run_fio "$qd" "$ios" "$work/fio-alloc-qd$qd.json"
    result[alloc-qd$qd]=$(total_ios "$work/fio-alloc-qd$qd.json")
done
log "idle"
perf_ev=("${base_ev[@]}" -e "$alloc_list")
measure idle sleep 2

if ((by_syscall)); then
    ev=raw_syscalls:sys_enter
    for sc in "${by_name[@]}"; do
        if [[ -d /sys/kernel/tracing/events/syscalls/sys_enter_$sc ||
            -d /sys/kernel/debug/tracing/events/syscalls/sys_enter_$sc ]]; then
            ev+=,syscalls:sys_enter_$sc
        fi
    done
    log "QD1: syscalls by name"
    perf_ev=(--per-thread -e "$ev" -e sched:sched_switch --filter 'prev_state & 3')
    measure bysys run_fio 1 "$ios" "$work/fio-bysys.json"
    bysys_total=$(total_ios "$work/fio-bysys.json")
fi

log "done"
# --- report --------------------------------------------------------------------------
per() { # file key divisor [scale] -> value/divisor
    counts "$1" | awk -v k="$2" -v d="$3" -v s="${4:-1}" '
        $1 == k { printf "%.2f", $2 * s / d; f = 1 }
        END { if (!f) printf "n/a" }'
}
ver=$("$tandem" --version 2>/dev/null || echo "?")
echo "tandem per-write cost: $ver ($tandem), $(date -u +%Y-%m-%dT%H:%MZ),"
echo "$(nproc) CPUs, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)."
if ((fill)); then
    filled="volume filled first (1 MiB sequential writes)"
else
    filled="sparse backing files (--no-fill)"
fi
echo "4 KiB randwrite, protocol C, fio nbd engine over a Unix socket, $ios writes per row,"
echo "$filled; counters from perf stat -p over every thread of each"
echo "daemon, divided by fio's completed writes. Wake-ups = context switches away from a thread"
echo "that blocks (sched_switch with prev_state S or D): each is one sleep and one wake-up. The"
echo "other context switches are preemptions by other load."
echo "Allocations = calls of ${alloc_events[*]/#probe_libc:/} (uprobes on glibc), counted in a"
echo "run of their own (a uprobe hit is a trap). fio's IOPS and mean latency and the CPU time"
echo "(utime+stime from /proc, 10 ms ticks) come from a third run with no perf attached."
echo
printf '%s' "| QD | daemon | syscalls/write | wake-ups/write | ctx switches/write | futex/write"
echo " | allocations/write | CPU µs/write | fio IOPS | fio mean lat µs |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for qd in 1 32; do
    read -r total _ <<<"${result[qd$qd]}"
    read -r iops lat cpu_a cpu_b <<<"${result[clean-qd$qd]}"
    for d in alpha beta; do
        f=$work/perf-qd$qd-$d.csv
        label="Primary alpha" cpu=$cpu_a
        [[ $d == beta ]] && label="Secondary beta" cpu=$cpu_b
        row="| QD$qd | $label | $(per "$f" raw_syscalls:sys_enter "$total")"
        row+=" | $(per "$f" sched:sched_switch "$total") | $(per "$f" context-switches "$total")"
        row+=" | $(per "$f" syscalls:sys_enter_futex "$total")"
        row+=" | $(per "$work/perf-alloc-qd$qd-$d.csv" alloc "${result[alloc-qd$qd]}")"
        echo "$row | $cpu | $iops | $lat |"
    done
done
echo
echo "Idle background (no IO, connected, Primary; per second over 2 s):"
echo
echo "| daemon | syscalls/s | wake-ups/s | ctx switches/s | futex/s | allocations/s | CPU ms/s |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for d in alpha beta; do
    f=$work/perf-idle-$d.csv
    label="Primary alpha"
    [[ $d == beta ]] && label="Secondary beta"
    row="| $label | $(per "$f" raw_syscalls:sys_enter 2) | $(per "$f" sched:sched_switch 2)"
    row+=" | $(per "$f" context-switches 2) | $(per "$f" syscalls:sys_enter_futex 2)"
    echo "$row | $(per "$f" alloc 2) | $(per "$f" task-clock 2) |"
done
echo
for qd in 1 32; do
    read -r total window <<<"${result[qd$qd]}"
    echo "QD$qd: $total writes completed; perf window ${window} s (with 0.5 s before fio starts)."
done
if ((by_syscall)); then
    echo
    echo "Syscalls by name and wake-ups by thread at QD1 (per write, $bysys_total writes; those"
    echo "at 0.01 per write or more; iou-wrk = io_uring's kernel workers in the daemon's process):"
    for d in alpha beta; do
        echo
        echo "$d:"
        "$py" - "$work/perf-bysys-$d.csv" "$bysys_total" <<'EOF'
import re, sys
n = int(sys.argv[2])
sc, wake = {}, {}
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) < 4 or line.startswith("#"):
        continue
    try:
        v = float(f[1])
    except ValueError:
        continue
    thread, event = f[0], f[3]
    if event == "sched:sched_switch":
        group = "iou-wrk" if thread.startswith("iou-wrk") else re.sub(r"-\d+$", "", thread)
        wake[group] = wake.get(group, 0) + v
    else:
        sc[event] = sc.get(event, 0) + v
every = sc.pop("raw_syscalls:sys_enter", 0)
rows = [(v / n, k.replace("syscalls:sys_enter_", "")) for k, v in sc.items() if v / n >= 0.01]
rows.sort(reverse=True)
print(f"  syscalls {every / n:.2f}: " + ", ".join(f"{name} {v:.2f}" for v, name in rows)
      + f", other {(every - sum(sc.values())) / n:.2f}")
print("  wake-ups " + ", ".join(f"{g} {v / n:.2f}" for g, v in sorted(wake.items())))
EOF
    done
fi
