#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the project's SLURM profile (workflow/profiles/slurm)
# before a real cluster, and for the tests that submit the tiny study through it.
#
#   bash workflow/profiles/slurm/local-cluster.sh install   # Debian packages (apt-get); a fast no-op once installed
#   bash workflow/profiles/slurm/local-cluster.sh start     # munged, MariaDB, slurmdbd, slurmctld, slurmd; until up
#   source /tmp/detr-sparsity-slurm/env.sh                  # SLURM_CONF (and PATH) for sbatch, sinfo, sacct, snakemake
#   snakemake --profile workflow/profiles/slurm --default-resources slurm_account=detr-sparsity slurm_partition=debug
#   bash workflow/profiles/slurm/local-cluster.sh status    # up or not (exit 0 when up), sinfo, the env lines
#   bash workflow/profiles/slurm/local-cluster.sh stop      # ends what `start` started, nothing else
#
# Through the Snakemake SLURM executor every job runs Snakemake itself twice (the batch step and the srun step it
# starts, about 170 MB each), and memory is enforced here: mem_mb of 100 gets a job killed, 500 or more is safe. The
# node has no GPU unless nvidia-smi shows one: a job asking for one (gpu=1: sbatch --gpus=1) is refused at
# submission ("Invalid generic resource (gres) specification"), so GPU stages need gpu=0 on such a machine.
#
# Everything lives under one state directory, ${LOCAL_CLUSTER_DIR:-/tmp/detr-sparsity-slurm}: configuration, munge
# key and socket, the MariaDB data directory, spool directories, logs (log/) and pid files (run/); a cleaner of /tmp
# that removes it under a running cluster breaks it (`stop` still finds the daemons, by the files they hold open).
# The system's own /etc/slurm, /etc/munge, munged and MariaDB are never read or changed by start and stop: every
# Slurm command finds this cluster through SLURM_CONF, and the daemons listen on ports of their own (below) so that
# they cannot collide with a system installation. One node, named after this host, with this machine's CPUs and
# memory (less a margin); partition `debug`; account `detr-sparsity` for root; accounting through slurmdbd, so that
# `sacct` answers as on a real cluster. Needs root: slurmd runs jobs as their submitting user, and `install` uses
# apt-get.
#
# Settings (environment): LOCAL_CLUSTER_DIR, LOCAL_CLUSTER_NAME (detr-local), LOCAL_CLUSTER_ACCOUNT
# (detr-sparsity), LOCAL_CLUSTER_PARTITION (debug), LOCAL_CLUSTER_TIMEOUT (seconds `start` waits in all, 120),
# LOCAL_CLUSTER_MEM_MARGIN_MB (memory kept back from the node for the daemons and the OS, 1024),
# LOCAL_CLUSTER_PORT_BASE (16800: slurmctld +17, slurmd +18, slurmdbd +19, MariaDB +6).
set -euo pipefail

DIR=${LOCAL_CLUSTER_DIR:-/tmp/detr-sparsity-slurm}
CLUSTER=${LOCAL_CLUSTER_NAME:-detr-local}
ACCOUNT=${LOCAL_CLUSTER_ACCOUNT:-detr-sparsity}
PARTITION=${LOCAL_CLUSTER_PARTITION:-debug}
TIMEOUT=${LOCAL_CLUSTER_TIMEOUT:-120}
MEM_MARGIN_MB=${LOCAL_CLUSTER_MEM_MARGIN_MB:-1024}
PORT_BASE=${LOCAL_CLUSTER_PORT_BASE:-16800}
# Not Slurm's and MariaDB's usual ports (6817-6819, 3306): a system installation may be listening there.
CTLD_PORT=$((PORT_BASE + 17))
SLURMD_PORT=$((PORT_BASE + 18))
DBD_PORT=$((PORT_BASE + 19))
DB_PORT=$((PORT_BASE + 6))

ETC=$DIR/etc
LOG=$DIR/log
RUN=$DIR/run
MUNGE_SOCKET=$RUN/munge.socket
DB_SOCKET=$RUN/mariadb.sock
export SLURM_CONF=$ETC/slurm.conf   # slurmdbd reads slurmdbd.conf from the same directory
# Node name: the short host name, which is what slurmd looks for in slurm.conf.
HOST=$(hostname -s)

# Debian packages. slurm-wlm = slurmctld + slurmd + slurm-client (sbatch, sinfo, sacct, sacctmgr, scontrol);
# slurmdbd pulls in the MySQL storage plugin; mariadb-client for the set-up SQL.
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client slurmdbd slurm-wlm-mysql-plugin munge mariadb-server mariadb-client)
# The daemons, in the order `start` starts them (`stop` ends them in reverse). Each has a pid file under run/.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

die() {
    echo "local-cluster: $*" >&2
    exit 1
}
say() { echo "local-cluster: $*"; }

log_of() { echo "$LOG/$1.log"; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "$1 needs root (slurmd runs jobs as their user; apt-get installs packages)"
}

# ---------------------------------------------------------------------------------------------------- install
cmd_install() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "already installed ($(dpkg-query -W -f='${Version}' slurmctld): ${PACKAGES[*]})"
        return 0
    fi
    need_root install
    say "installing ${missing[*]}"
    # No service may start during the installation: `start` runs its own daemons, and a system MariaDB, munged or
    # slurmctld left running would outlive the tests. policy-rc.d (101 = action forbidden) is how Debian's
    # maintainer scripts are told so; a container often has one already, which is then left as it is.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ $created_policy -eq 1 ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
    say "installed slurm $(dpkg-query -W -f='${Version}' slurmctld), munge $(dpkg-query -W -f='${Version}' munge)," \
        "mariadb $(dpkg-query -W -f='${Version}' mariadb-server)"
}

# ------------------------------------------------------------------------------------------------- processes
# The pid a daemon's pid file names, if that process is alive and still that daemon (a pid can be reused).
live_pid() {
    local name=$1 file=$RUN/$1.pid pid comm
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && [[ -r /proc/$pid/comm ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    # /proc/<pid>/comm holds at most 15 characters
    [[ $comm == "${name:0:15}" ]] || return 1
    echo "$pid"
}

# A process that has ended but is not yet reaped (a zombie, state Z) counts as gone. The daemons' parent is init,
# which reaps them within seconds (`stop` waits for that at the end, so that ps shows none of them afterwards).
STOPPED=()
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

stop_daemon() {
    local name=$1 pid i
    if ! pid=$(live_pid "$name"); then
        rm -f "$RUN/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    # MariaDB flushes InnoDB on TERM, which takes a few seconds; the others end at once.
    for ((i = 0; i < 300; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$name (pid $pid) did not end within 30 s of SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$RUN/$name.pid"
    STOPPED+=("$pid")
    say "stopped $name (pid $pid)"
}

# Slurm, MariaDB and munge processes that hold a file under the state directory open, deleted files included:
# slurmstepd (one per job step, holding slurmd.log), which outlives slurmd while a job runs, and the daemons
# themselves when their pid files are gone (a state directory removed under a running cluster: /tmp cleaned).
# Other programs with a file open there (a `tail -f` of a log) are not this script's to end.
stray_pids() {
    local proc pid comm fd
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        comm=$(cat "$proc/comm" 2>/dev/null) || continue
        [[ $comm =~ ^(slurmstepd|slurmd|slurmctld|slurmscriptd|slurmdbd|mariadbd|munged)$ ]] || continue
        alive "$pid" || continue
        for fd in "$proc"/fd/*; do
            if [[ $(readlink "$fd" 2>/dev/null) == "$DIR"/* ]]; then
                echo "$pid"
                break
            fi
        done
    done
}

port_free() {
    ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

check_port() {
    port_free "$1" || die "port $1 ($2) is in use; choose other ports with LOCAL_CLUSTER_PORT_BASE (now $PORT_BASE)"
}

# wait_for <what> <log file> <command...>: run the command every half second until it succeeds, until DEADLINE
# (TIMEOUT s after `start` began: the bound is on the whole start, not on each daemon).
DEADLINE=$((SECONDS + TIMEOUT))
wait_for() {
    local what=$1 logfile=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= DEADLINE)); then
            echo "local-cluster: $what did not come up within $TIMEOUT s of start; read $logfile (last lines below)" >&2
            tail -n 20 "$logfile" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.5
    done
}

node_idle() {
    local state
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null) || return 1
    [[ $state == idle ]]
}

# ----------------------------------------------------------------------------------------------------- start
start_munged() {
    # A key of our own; the system's /etc/munge/munge.key (if any) stays untouched and unused.
    if [[ ! -s $ETC/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$ETC/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$ETC/munge.key"
    # Its own socket, pid, log and seed files: a system munged (on /run/munge/munge.socket.2) is left alone.
    munged --socket="$MUNGE_SOCKET" --key-file="$ETC/munge.key" --pid-file="$RUN/munged.pid" \
        --log-file="$(log_of munged)" --seed-file="$RUN/munged.seed" ||
        die "munged did not start; read $(log_of munged)"
    wait_for munged "$(log_of munged)" bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"
}

sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -N -B -e "$1"; }

start_mariadb() {
    mkdir -p "$DIR/mysql"
    if [[ ! -d $DIR/mysql/mysql ]]; then
        # Root connects through the Unix socket only (unix_socket authentication): no password to keep.
        mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
            --skip-test-db >"$(log_of mariadb-install)" 2>&1 ||
            die "mariadb-install-db failed; read $(log_of mariadb-install)"
    fi
    check_port "$DB_PORT" MariaDB
    # Small buffers: the accounting database holds a few rows. The lock timeout is the one Slurm's
    # documentation asks for. TCP on 127.0.0.1 only, for slurmdbd (whose plugin cannot be given a socket path).
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DB_SOCKET" \
        --pid-file="$RUN/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$(log_of mariadbd)" --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-lock-wait-timeout=900 --max-connections=50 </dev/null >/dev/null 2>&1 &
    wait_for MariaDB "$(log_of mariadbd)" mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping
    # slurmdbd's database user; the password is made once and kept (mode 600) beside the data.
    if [[ ! -s $ETC/db-password ]]; then
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$ETC/db-password")
    fi
    local pw
    pw=$(cat "$ETC/db-password")
    sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
         ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
         CREATE DATABASE IF NOT EXISTS slurm_acct_db;
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

write_slurmdbd_conf() {
    (
        umask 077 # slurmdbd refuses a slurmdbd.conf others can read (it holds the database password)
        cat >"$ETC/slurmdbd.conf" <<EOF
# Generated by workflow/profiles/slurm/local-cluster.sh; rewritten at every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$(log_of slurmdbd)
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db-password")
StorageLoc=slurm_acct_db
EOF
    )
}

# This machine's node line: slurmd -C reports what slurmd will detect (CPUs, sockets, cores, threads, memory);
# slurmd drains a node whose slurm.conf line promises more than that, so memory is the detected less a margin.
node_line() {
    local detected real_mem gpus line
    detected=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') || detected=
    if [[ -z $detected ]]; then
        # Fallback: nproc and /proc/meminfo
        detected="NodeName=$HOST CPUs=$(nproc) RealMemory=$(($(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024))"
    fi
    real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
    line=$(sed -e "s/^NodeName=[^ ]*/NodeName=$HOST/" -e 's/ UpTime=.*//' \
        -e "s/RealMemory=[0-9]*/RealMemory=$((real_mem - MEM_MARGIN_MB))/" <<<"$detected")
    # GPUs only where nvidia-smi sees some; gres.conf names their device files.
    gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if ((gpus > 0)); then
        line="$line Gres=gpu:$gpus"
    fi
    echo "$line NodeAddr=127.0.0.1 State=UNKNOWN"
}

write_slurm_conf() {
    local node gpus
    node=$(node_line)
    gpus=$(sed -n 's/.*Gres=gpu:\([0-9]*\).*/\1/p' <<<"$node")
    cat >"$SLURM_CONF" <<EOF
# Generated by workflow/profiles/slurm/local-cluster.sh; rewritten at every start.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
# Daemons as root: a test cluster on one machine, whose jobs run as the submitting user
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/spool/slurmctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$(log_of slurmctld)
SlurmdLogFile=$(log_of slurmd)
SlurmctldDebug=info
SlurmdDebug=info
# Cgroups are seldom delegated inside a container: processes tracked through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# A node that went down (slurmd restarted, the machine rebooted) comes back into service by itself
ReturnToService=2
SchedulerType=sched/backfill
# Cores and memory are the consumable resources, as on most clusters: --mem is a real request
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job without --mem gets this much per CPU, not the whole node
DefMemPerCPU=512
# Memory enforced without cgroups: slurmstepd samples each task's RSS every second and kills a step over its --mem
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# The munged to use for slurmdbd connections (sacct, sacctmgr, slurmctld): AuthInfo covers only the others
AccountingStoragePass=$MUNGE_SOCKET
# Jobs must name an account that exists (or use the user's default), as on most real clusters
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
$( ((gpus > 0)) && echo "GresTypes=gpu")
# Quick turnaround for tests: cancelled jobs get 5 s before SIGKILL, finished jobs stay in squeue for 5 min
KillWait=5
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
$node
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if ((gpus > 0)); then
        echo "Name=gpu File=/dev/nvidia[0-$((gpus - 1))]" >"$ETC/gres.conf"
    else
        rm -f "$ETC/gres.conf"
    fi
}

# sacctmgr add ... only where the entity is missing: adding one that exists is an error for sacctmgr.
register() {
    if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P show account "$ACCOUNT" format=account 2>/dev/null) ]]; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" \
            description="detr-sparsity pipeline tests" organization=detr-sparsity >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P show assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=user 2>/dev/null) ]]
    then
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    fi
    sacctmgr -i modify user root set defaultaccount="$ACCOUNT" >/dev/null 2>&1 || true
}

# Slurm's client commands under bin/, each setting SLURM_CONF (when unset) before running the real one. The Snakemake
# SLURM executor's job step removes every SLURM_* variable but a few job ids before it calls srun inside the job
# (snakemake-executor-plugin-slurm-jobstep 0.6), SLURM_CONF included: srun would then look for
# /etc/slurm/slurm.conf. With bin/ first in PATH (env.sh; sbatch passes PATH on to the job) it finds this cluster.
make_shims() {
    local cmd real
    mkdir -p "$DIR/bin"
    for cmd in srun sbatch salloc squeue scancel sacct sacctmgr sinfo scontrol sstat sattach sprio sshare; do
        real=$(type -aP "$cmd" | grep -v -m1 "^$DIR/bin/") || continue
        printf '#!/bin/sh\n# %s of the cluster of local-cluster.sh, also where SLURM_CONF was removed\n%s\n%s\n' \
            "$cmd" "export SLURM_CONF=\"\${SLURM_CONF:-$SLURM_CONF}\"" "exec $real \"\$@\"" >"$DIR/bin/$cmd"
        chmod 755 "$DIR/bin/$cmd"
    done
}

write_env() {
    make_shims
    cat >"$DIR/env.sh" <<EOF
# The local SLURM cluster of workflow/profiles/slurm/local-cluster.sh: source this file, then sbatch, sinfo,
# sacct and snakemake --profile workflow/profiles/slurm reach it.
export SLURM_CONF=$SLURM_CONF
case ":\$PATH:" in *":$DIR/bin:"*) ;; *) export PATH="$DIR/bin:\$PATH" ;; esac
export LOCAL_CLUSTER_DIR=$DIR
export LOCAL_CLUSTER_ACCOUNT=$ACCOUNT
export LOCAL_CLUSTER_PARTITION=$PARTITION
EOF
}

all_up() {
    local d
    for d in "${DAEMONS[@]}"; do
        live_pid "$d" >/dev/null || return 1
    done
}

cmd_start() {
    need_root start
    local cmd
    for cmd in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr sinfo sacct; do
        command -v "$cmd" >/dev/null || die "$cmd not found: run '$0 install' first"
    done
    if all_up && node_idle && sacct -n -X >/dev/null 2>&1; then
        say "already up"
        cmd_status
        return 0
    fi
    # Part of it running (an interrupted start, a daemon that died): begin again from nothing running.
    cmd_stop quiet
    local t0=$SECONDS
    DEADLINE=$((SECONDS + TIMEOUT))
    mkdir -p "$ETC" "$LOG" "$RUN" "$DIR/spool/slurmctld" "$DIR/spool/slurmd"
    # munged wants its socket's directories searchable by all and writable by no one else; the keys, the
    # database password and slurmdbd.conf stay private
    chmod 755 "$DIR" "$RUN"
    chmod 700 "$ETC"
    # If anything below fails, end what was started (the logs stay)
    trap 'echo "local-cluster: start failed; stopping what it started (logs in $LOG)" >&2; cmd_stop quiet' EXIT
    check_port "$CTLD_PORT" slurmctld
    check_port "$SLURMD_PORT" slurmd
    check_port "$DBD_PORT" slurmdbd
    start_munged
    say "munged up ($MUNGE_SOCKET)"
    start_mariadb
    say "MariaDB up (127.0.0.1:$DB_PORT, $DIR/mysql)"
    write_slurmdbd_conf
    write_slurm_conf
    slurmdbd || die "slurmdbd did not start; read $(log_of slurmdbd)"
    wait_for slurmdbd "$(log_of slurmdbd)" sacctmgr -n show cluster
    register
    say "slurmdbd up (cluster $CLUSTER, account $ACCOUNT for root)"
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start; read $(log_of slurmctld)"
    wait_for slurmctld "$(log_of slurmctld)" scontrol ping
    slurmd -f "$SLURM_CONF" || die "slurmd did not start; read $(log_of slurmd)"
    # A node left down or drained by an earlier run: back into service
    sleep 1
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for "node $HOST (idle in sinfo)" "$(log_of slurmd)" node_idle
    wait_for "sacct" "$(log_of slurmdbd)" sacct -n -X
    trap - EXIT
    write_env
    say "up in $((SECONDS - t0)) s"
    cmd_status
}

# ------------------------------------------------------------------------------------------------------ stop
cmd_stop() {
    local quiet=${1:-} pid i strays
    # Jobs first: their slurmstepd would outlive slurmd. Cancel, then give them KillWait (5 s) and a margin.
    if live_pid slurmctld >/dev/null && [[ -s $SLURM_CONF ]]; then
        if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
            squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    # What is left of this cluster without a pid file (see stray_pids): SIGTERM, then SIGKILL after 10 s.
    strays=$(stray_pids)
    if [[ -n $strays ]]; then
        for pid in $strays; do
            say "ending leftover $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
        done
        for ((i = 0; i < 100; i++)); do
            [[ -z $(stray_pids) ]] && break
            sleep 0.1
        done
        for pid in $(stray_pids); do
            kill -KILL "$pid" 2>/dev/null || true
        done
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    for pid in "${STOPPED[@]}"; do
        for ((i = 0; i < 50; i++)); do
            [[ -e /proc/$pid ]] || break
            sleep 0.1
        done
    done
    [[ -n $quiet ]] || say "stopped (state and logs kept in $DIR)"
}

# ---------------------------------------------------------------------------------------------------- status
cmd_status() {
    local d pid up=1
    for d in "${DAEMONS[@]}"; do
        if pid=$(live_pid "$d"); then
            echo "  $d: running (pid $pid)"
        else
            echo "  $d: not running"
            up=0
        fi
    done
    if ((up)) && node_idle_or_busy; then
        echo "local-cluster: up ($CLUSTER, state in $DIR)"
        sinfo
        echo "Environment (or: source $DIR/env.sh):"
        echo "  export SLURM_CONF=$SLURM_CONF"
        echo "  export PATH=$DIR/bin:\$PATH    # Slurm's commands that find this cluster without SLURM_CONF too"
        echo "Submit with: --account=$ACCOUNT --partition=$PARTITION" \
            "(snakemake: --default-resources slurm_account=$ACCOUNT slurm_partition=$PARTITION)"
        return 0
    fi
    echo "local-cluster: down (state in $DIR; logs in $LOG)"
    return 1
}

# Up for status: slurmctld answers and the node is usable (idle, or running jobs)
node_idle_or_busy() {
    local state
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null) || return 1
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 install|start|stop|status   (state in \${LOCAL_CLUSTER_DIR:-/tmp/detr-sparsity-slurm})" >&2
    exit 2
    ;;
esac
