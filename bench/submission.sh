#!/usr/bin/env bash
# Submission benchmark: subrelay (and, with --compare-postfix, a private Postfix + OpenDKIM
# instance configured the same way) loaded by subrelay-loadgen over STARTTLS (or implicit TLS)
# + AUTH PLAIN.
#
#   bench/submission.sh [--runs N] [--duration S] [--compare-postfix | --postfix-only] [...]
#
# Prints every run and the median per scenario and server; with --compare-postfix also the
# ratio subrelay/postfix. See bench/README.md for what the scenarios measure and the caveats.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build-bench
RUNS=3
DURATION=10
CONNECTIONS=50
SIZE=4096
THREADS=1
COMPARE=0
RUN_SUBRELAY=1
KEEP=0
JSON_OUT=""
SCENARIO_FILTER=""
SUBRELAY_PORT=25870
SUBRELAY_TLS_PORT=25871
POSTFIX_PORT=25872
POSTFIX_TLS_PORT=25873
TLS_MODE=starttls
DKIM_MODE=rsa
IDEM_MODE=off
LIMITS_MODE=none
METRICS_MODE=off
WEBHOOK_MODE=off
WEBHOOK_PORT=19443
WEBHOOK_PID=""
METRICS_PORT=19587
SCRAPER_PID=""
PASSWORD="bench-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"

usage() {
  cat <<EOF
usage: bench/submission.sh [options]
  --runs N            runs per scenario (default $RUNS); the table shows each run and the median
  --duration S        seconds per run (default $DURATION)
  --connections N     clients in the 50-client scenarios (default $CONNECTIONS)
  --size BYTES        message size (default $SIZE)
  --threads T         loadgen event-loop threads (default $THREADS)
  --compare-postfix   also run every scenario against Postfix + OpenDKIM + Cyrus SASL, print ratios
  --postfix-only      run only the Postfix half (for checking the comparison setup)
  --scenarios LIST    comma-separated subset of: pooled1,pooled,permsg,permsg-resume,halfload
  --build-dir DIR     build directory (default build-bench, release build)
  --tls MODE          starttls (default: port 587 style) or implicit (port 465 style) for every scenario
  --dkim MODE         subrelay's signing: rsa (default: RSA-2048, the key OpenDKIM uses), dual
                      (RSA-2048 and Ed25519 on every message) or none (no dkim section)
  --idempotency MODE  off (default) or on: every message subrelay gets carries its own
                      Idempotency-Key (loadgen --idempotency-keys), the cost of the check
  --limits MODE       none (default) or all: the bench account gets a rate limit of every kind
                      (messages/recipients per second..month, bytes per day), set high enough never
                      to refuse, so every check and the window persistence run (issue 5's cost)
  --metrics MODE      off (default) or on: metrics.address on 127.0.0.1:$METRICS_PORT and a
                      scraper fetching /metrics every second for the whole run (issue 11's cost)
  --webhook MODE      off (default), on (the bench account has a webhook for every event;
                      bench/webhook_receiver.py answers on 127.0.0.1:$WEBHOOK_PORT) or down (the
                      same webhook, nothing listening: every event waits in the outbox and is
                      retried), the cost of writing events with each message (issue 13)
  --ports A,B,C,D     subrelay STARTTLS, subrelay implicit TLS, Postfix STARTTLS, Postfix implicit TLS
                      (default $SUBRELAY_PORT,$SUBRELAY_TLS_PORT,$POSTFIX_PORT,$POSTFIX_TLS_PORT)
  --json-out FILE     also write every run's loadgen JSON (one object per line) to FILE
  --keep              keep the temporary directory (configs, logs) for inspection
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --compare-postfix) COMPARE=1; shift ;;
    --postfix-only) COMPARE=1; RUN_SUBRELAY=0; shift ;;
    --scenarios) SCENARIO_FILTER=$2; shift 2 ;;
    --build-dir) BUILD=$(realpath -m "$2"); shift 2 ;;
    --ports) IFS=, read -r SUBRELAY_PORT SUBRELAY_TLS_PORT POSTFIX_PORT POSTFIX_TLS_PORT <<<"$2"; shift 2 ;;
    --tls) TLS_MODE=$2; shift 2 ;;
    --dkim) DKIM_MODE=$2; shift 2 ;;
    --limits) LIMITS_MODE=$2; shift 2 ;;
    --idempotency) IDEM_MODE=$2; shift 2 ;;
    --metrics) METRICS_MODE=$2; shift 2 ;;
    --webhook) WEBHOOK_MODE=$2; shift 2 ;;
    --json-out) JSON_OUT=$(realpath -m "$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "submission.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $TLS_MODE == starttls || $TLS_MODE == implicit ]] || { echo "submission.sh: --tls starttls|implicit" >&2; exit 2; }
for v in RUNS DURATION CONNECTIONS SIZE THREADS SUBRELAY_PORT SUBRELAY_TLS_PORT POSTFIX_PORT POSTFIX_TLS_PORT; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "submission.sh: bad value for $v: '${!v}'" >&2; exit 2; }
done
[[ $METRICS_MODE == off || $METRICS_MODE == on ]] || { echo "submission.sh: --metrics off|on, got '$METRICS_MODE'" >&2; exit 2; }
[[ $WEBHOOK_MODE == off || $WEBHOOK_MODE == on || $WEBHOOK_MODE == down ]] \
  || { echo "submission.sh: --webhook off|on|down, got '$WEBHOOK_MODE'" >&2; exit 2; }
[[ $IDEM_MODE == off || $IDEM_MODE == on ]] || { echo "submission.sh: --idempotency off|on, got '$IDEM_MODE'" >&2; exit 2; }
[[ $LIMITS_MODE == none || $LIMITS_MODE == all ]] || { echo "submission.sh: --limits none|all, got '$LIMITS_MODE'" >&2; exit 2; }
[[ $DKIM_MODE == none || $DKIM_MODE == rsa || $DKIM_MODE == dual ]] \
  || { echo "submission.sh: --dkim none|rsa|dual, got '$DKIM_MODE'" >&2; exit 2; }
(( RUNS <= 50 && DURATION <= 600 )) || { echo "submission.sh: --runs <= 50 and --duration <= 600" >&2; exit 2; }

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

log "rate limits on the bench account: $LIMITS_MODE (--limits)"
die() { log "error: $*"; exit 1; }

SCENARIOS=(pooled1 pooled permsg permsg-resume halfload)
for s in ${SCENARIO_FILTER//,/ }; do
  [[ " ${SCENARIOS[*]} " == *" $s "* ]] || { echo "submission.sh: unknown scenario '$s' (known: ${SCENARIOS[*]})" >&2; exit 2; }
done

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
if [[ ! -d $BUILD ]]; then
  log "configuring release build in $BUILD"
  meson setup "$BUILD" "$ROOT" --buildtype=release >/dev/null
fi
if (( RUN_SUBRELAY )); then
  log "building (ninja -C $BUILD)"
  ninja -C "$BUILD" >/dev/null || die "build failed: run ninja -C $BUILD to see why"
else
  ninja -C "$BUILD" bench/subrelay-loadgen >/dev/null || die "loadgen build failed"
fi
LOADGEN=$BUILD/bench/subrelay-loadgen
SUBRELAY=$BUILD/src/app/subrelay
[[ -x $LOADGEN ]] || die "missing $LOADGEN"

# ---------------------------------------------------------------------------------------------
# Temporary directory and cleanup. It lives in the build directory: on the real disk (not a
# tmpfs, where fsync would cost nothing), and with no world-writable directory in its path
# (OpenDKIM refuses a configuration file below /tmp or /var/tmp).
# ---------------------------------------------------------------------------------------------
TMP=$(mktemp -d "$BUILD/bench-run.XXXXXX")
chmod 755 "$TMP"   # Postfix's smtpd (user postfix) must reach the OpenDKIM socket inside
SUBRELAY_PID=""
SUBRELAY_DKIM=""
OPENDKIM_PID=""
POSTFIX_STARTED=0

cleanup() {
  local rc=$?
  set +e
  [[ -n $SCRAPER_PID ]] && kill "$SCRAPER_PID" 2>/dev/null
  [[ -n $WEBHOOK_PID ]] && kill "$WEBHOOK_PID" 2>/dev/null
  if [[ -n $SUBRELAY_PID ]] && kill -0 "$SUBRELAY_PID" 2>/dev/null; then
    kill -TERM "$SUBRELAY_PID"
    for _ in $(seq 1 100); do kill -0 "$SUBRELAY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$SUBRELAY_PID" 2>/dev/null && { log "subrelay ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$SUBRELAY_PID"; }
    wait "$SUBRELAY_PID" 2>/dev/null
  fi
  if (( POSTFIX_STARTED )); then
    postfix -c "$TMP/postfix/conf" stop >/dev/null 2>&1
    for _ in $(seq 1 50); do [[ -e $TMP/postfix/queue/pid/master.pid ]] || break; sleep 0.1; done
  fi
  if [[ -n $OPENDKIM_PID ]] && kill -0 "$OPENDKIM_PID" 2>/dev/null; then
    kill -TERM "$OPENDKIM_PID"
    for _ in $(seq 1 50); do kill -0 "$OPENDKIM_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  if (( KEEP )); then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, seconds, pid to watch (optional)
  local i
  for ((i = 0; i < $2 * 20; i++)); do
    port_open "$1" && return 0
    if [[ -n ${3:-} ]] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
    sleep 0.05
  done
  return 1
}

for p in $SUBRELAY_PORT $SUBRELAY_TLS_PORT $POSTFIX_PORT $POSTFIX_TLS_PORT; do
  port_open "$p" && die "port $p is already in use (pick others with --ports)"
done

log "self-signed RSA-2048 certificate"
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 2 -subj "/CN=bench.test" \
  -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" >/dev/null 2>&1 || die "openssl req failed"
chmod 644 "$TMP/key.pem"   # read by the Postfix and subrelay processes; a throw-away key
log "RSA-2048 DKIM key (the same key for subrelay and OpenDKIM)"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TMP/dkim.pem" >/dev/null 2>&1 \
  || die "openssl genpkey failed"
if [[ $DKIM_MODE == dual ]]; then
  log "Ed25519 DKIM key (subrelay only: --dkim dual)"
  openssl genpkey -algorithm ed25519 -out "$TMP/dkim-ed.pem" >/dev/null 2>&1 || die "openssl genpkey ed25519 failed"
fi

# ---------------------------------------------------------------------------------------------
# subrelay
# ---------------------------------------------------------------------------------------------
start_subrelay() {
  [[ -x $SUBRELAY ]] || die "missing $SUBRELAY"
  mkdir -p "$TMP/subrelay/data"
  local hash
  hash=$(printf %s "$PASSWORD" | "$SUBRELAY" hash-password) || die "subrelay hash-password failed"
  hash=$(printf %s "$hash" | tr -d '\r\n')
  [[ -n $hash ]] || die "subrelay hash-password printed nothing"
  # rsa: signs with the same RSA-2048 key as OpenDKIM does for Postfix; dual: that key
  # and an Ed25519 one (two signatures per message); none: no signing at all.
  local rsa_entry='{ "domain": "bench.test", "selector": "bench", "algorithm": "rsa-sha256", "private_key": "'"$TMP/dkim.pem"'" }'
  local ed_entry='{ "domain": "bench.test", "selector": "benched", "algorithm": "ed25519-sha256", "private_key": "'"$TMP/dkim-ed.pem"'" }'
  local dkim_section=""
  case $DKIM_MODE in
    rsa) dkim_section='"dkim": [ '"$rsa_entry"' ],' ;;
    dual) dkim_section='"dkim": [ '"$rsa_entry"', '"$ed_entry"' ],' ;;
  esac
  if [[ $WEBHOOK_MODE != off ]]; then
    printf 'whsec_bench\n' >"$TMP/hook.secret"
    chmod 600 "$TMP/hook.secret"
  fi
  if [[ $WEBHOOK_MODE == on && -z $WEBHOOK_PID ]]; then
    python3 "$ROOT/bench/webhook_receiver.py" --port "$WEBHOOK_PORT" --cert "$TMP/cert.pem" --key "$TMP/key.pem" \
      --secret-file "$TMP/hook.secret" --stats "$TMP/webhook-stats.json" &
    WEBHOOK_PID=$!
    wait_port "$WEBHOOK_PORT" 10 "$WEBHOOK_PID" || die "bench/webhook_receiver.py did not listen on $WEBHOOK_PORT"
    log "webhook receiver on 127.0.0.1:$WEBHOOK_PORT"
  fi
  write_subrelay_config "$hash" "$dkim_section"
  if ! "$SUBRELAY" check-config -c "$TMP/subrelay/config.json" >"$TMP/subrelay/check.log" 2>&1; then
    log "warning: subrelay rejects the dkim section ($(head -c 300 "$TMP/subrelay/check.log")): running without DKIM"
    write_subrelay_config "$hash" ""
    "$SUBRELAY" check-config -c "$TMP/subrelay/config.json" >"$TMP/subrelay/check.log" 2>&1 \
      || { cat "$TMP/subrelay/check.log" >&2; die "subrelay check-config failed"; }
  fi
  log "starting subrelay serve on 127.0.0.1:$SUBRELAY_PORT (starttls) and :$SUBRELAY_TLS_PORT (implicit)"
  "$SUBRELAY" serve -c "$TMP/subrelay/config.json" >"$TMP/subrelay/stdout.log" 2>"$TMP/subrelay/stderr.log" &
  SUBRELAY_PID=$!
  if [[ $METRICS_MODE == on ]]; then
    # What a Prometheus server does, only 15 times as often: a full scrape every second.
    ( while sleep 1; do curl -s -o /dev/null "http://127.0.0.1:$METRICS_PORT/metrics"; done ) &
    SCRAPER_PID=$!
    log "metrics on 127.0.0.1:$METRICS_PORT, scraped every second"
  fi
  if ! wait_port "$SUBRELAY_PORT" 20 "$SUBRELAY_PID"; then
    tail -n 20 "$TMP/subrelay/stderr.log" >&2
    die "subrelay did not listen on $SUBRELAY_PORT"
  fi
  # Probe: one message on each listener, then look at what was stored: is it DKIM-signed?
  local port
  for port in "$SUBRELAY_PORT" "$SUBRELAY_TLS_PORT"; do
    local mode=starttls
    [[ $port == "$SUBRELAY_TLS_PORT" ]] && mode=implicit
    if ! "$LOADGEN" --port "$port" --tls "$mode" --user bench --password "$PASSWORD" --messages 1 --timeout 10 \
         >"$TMP/subrelay/probe-$mode.log" 2>&1; then
      grep -E "failed|error" "$TMP/subrelay/probe-$mode.log" >&2
      [[ $mode == "$TLS_MODE" ]] && die "probe message to subrelay ($mode, port $port) failed"
      log "warning: probe message to subrelay ($mode, port $port) failed; the benchmark uses $TLS_MODE"
    fi
  done
  local id
  id=$("$SUBRELAY" queue list -c "$TMP/subrelay/config.json" 2>/dev/null | awk 'NR == 1 { print $1 }')
  local nsig=0
  if [[ -n $id ]]; then
    nsig=$("$SUBRELAY" queue show "$id" --raw -c "$TMP/subrelay/config.json" 2>/dev/null | grep -c '^DKIM-Signature:' || true)
  fi
  if [[ $DKIM_MODE == none ]]; then
    SUBRELAY_DKIM=none
    (( nsig == 0 )) || die "--dkim none, yet the probe message has $nsig DKIM-Signature fields"
    log "subrelay signs nothing (--dkim none)"
  elif [[ $DKIM_MODE == dual ]] && (( nsig == 2 )); then
    SUBRELAY_DKIM=dual
    log "subrelay dual-signs (RSA-2048 + Ed25519)"
  elif (( nsig >= 1 )); then
    SUBRELAY_DKIM=yes
  else
    SUBRELAY_DKIM=no
    log "WARNING: the probe message stored by subrelay has no DKIM-Signature: subrelay does not sign" \
        "(yet), so the comparison with Postfix + OpenDKIM is not like for like"
  fi
}

rate_limits_json() {
  [[ $LIMITS_MODE == all ]] || return 0
  local big=1000000000
  printf ',\n      "rate_limits": { "messages_per_second": %s, "messages_per_minute": %s, "messages_per_hour": %s,' $big $big $big
  printf ' "messages_per_day": %s, "messages_per_month": %s, "recipients_per_second": %s, "recipients_per_hour": %s,' $big $big $big $big
  printf ' "recipients_per_day": %s, "bytes_per_day": 1000000000000 }' $big
}

webhook_json() {  # the account's webhook (--webhook on|down) and the CA that signs the receiver
  [[ $WEBHOOK_MODE == off ]] && return 0
  printf ',\n      "webhook": { "url": "https://127.0.0.1:%s/events", "secret_file": "%s" }' "$WEBHOOK_PORT" "$TMP/hook.secret"
}

webhooks_json() {
  [[ $WEBHOOK_MODE == off ]] && return 0
  printf '"webhooks": { "ca_file": "%s" },' "$TMP/cert.pem"
}

metrics_json() {
  [[ $METRICS_MODE == on ]] && printf '"metrics": { "address": "127.0.0.1:%s" },' "$METRICS_PORT"
  return 0
}

write_subrelay_config() {  # password hash, dkim section (or empty)
  cat >"$TMP/subrelay/config.json" <<EOF
{
  "hostname": "bench.test",
  "data_dir": "$TMP/subrelay/data",
  "tls": { "certificate": "$TMP/cert.pem", "private_key": "$TMP/key.pem" },
  "listeners": [
    { "address": "127.0.0.1:$SUBRELAY_PORT", "tls": "starttls" },
    { "address": "127.0.0.1:$SUBRELAY_TLS_PORT", "tls": "implicit" }
  ],
  "limits": { "max_connections": 5000, "max_connections_per_ip": 5000 },
  $(metrics_json)
  $(webhooks_json)
  $2
  "accounts": [
    { "username": "bench", "password_hash": "$1", "senders": ["@bench.test"], "mode": "capture"$(rate_limits_json)$(webhook_json) }
  ]
}
EOF
}

# ---------------------------------------------------------------------------------------------
# Postfix + Cyrus SASL (sasldb) + OpenDKIM (RSA-2048, milter on a unix socket)
# ---------------------------------------------------------------------------------------------
install_postfix_packages() {
  local need=()
  command -v postfix >/dev/null || need+=(postfix)
  command -v saslpasswd2 >/dev/null || need+=(sasl2-bin)
  [[ -e /usr/lib/x86_64-linux-gnu/sasl2/libsasldb.so || -n $(compgen -G "/usr/lib/*/sasl2/libsasldb.so*") ]] \
    || need+=(libsasl2-modules-db)
  [[ -n $(compgen -G "/usr/lib/*/sasl2/libplain.so*") ]] || need+=(libsasl2-modules)
  command -v opendkim >/dev/null || need+=(opendkim)
  (( ${#need[@]} == 0 )) && return 0
  log "installing ${need[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >"$TMP/apt.log" 2>&1; then
    apt-get update >>"$TMP/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >>"$TMP/apt.log" 2>&1 \
      || { tail -n 20 "$TMP/apt.log" >&2; die "apt-get install failed"; }
  fi
}

start_postfix() {
  install_postfix_packages
  local pf=$TMP/postfix dk=$TMP/opendkim
  mkdir -p "$pf/conf/sasl" "$pf/queue" "$pf/data" "$dk"

  # OpenDKIM: signs mail from bench.test with an RSA-2048 key, milter on a unix socket.
  cp "$TMP/dkim.pem" "$dk/bench.private"
  chown -R opendkim:opendkim "$dk"
  chmod 700 "$dk/bench.private"
  chmod 755 "$dk"
  cat >"$dk/opendkim.conf" <<EOF
Syslog                  no
Mode                    s
Domain                  bench.test
Selector                bench
KeyFile                 $dk/bench.private
SignatureAlgorithm      rsa-sha256
Canonicalization        relaxed/relaxed
InternalHosts           127.0.0.1
Socket                  local:$dk/opendkim.sock
UMask                   000
UserID                  opendkim:opendkim
PidFile                 $dk/opendkim.pid
Background              no
EOF
  log "starting opendkim (milter at $dk/opendkim.sock)"
  opendkim -x "$dk/opendkim.conf" >"$dk/opendkim.log" 2>&1 &
  OPENDKIM_PID=$!
  local i
  for ((i = 0; i < 200; i++)); do [[ -S $dk/opendkim.sock ]] && break; sleep 0.05; done
  [[ -S $dk/opendkim.sock ]] || { cat "$dk/opendkim.log" >&2; die "opendkim did not create its socket"; }

  # Cyrus SASL with sasldb: user bench in realm bench.test. Debian's smtpd looks for smtpd.conf
  # in $config_directory/sasl whatever cyrus_sasl_config_path says, so it goes there (and
  # cyrus_sasl_config_path points there too).
  cat >"$pf/conf/sasl/smtpd.conf" <<EOF
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: $pf/sasldb2
mech_list: PLAIN LOGIN
EOF
  printf %s "$PASSWORD" | saslpasswd2 -c -p -f "$pf/sasldb2" -u bench.test bench || die "saslpasswd2 failed"
  chown postfix "$pf/sasldb2"
  chmod 600 "$pf/sasldb2"

  cat >"$pf/conf/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $pf/queue
data_directory = $pf/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = bench.test
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
inet_protocols = ipv4
maillog_file = $pf/maillog
maillog_file_prefixes = $pf
smtp_dns_support_level = disabled
alias_maps =
alias_database =
local_recipient_maps =
biff = no
# Accepted mail is queued (with fsync, Postfix's default) and then discarded, not delivered.
default_transport = discard:bench
relay_transport = discard:bench
local_transport = discard:bench
virtual_transport = discard:bench
default_process_limit = 200
smtpd_banner = \$myhostname ESMTP
# STARTTLS with the same RSA-2048 certificate as subrelay; AUTH only after STARTTLS.
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_chain_files = $TMP/key.pem, $TMP/cert.pem
smtpd_tls_received_header = yes
# AUTH PLAIN/LOGIN through Cyrus SASL, sasldb.
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = $pf/conf/sasl
smtpd_sasl_local_domain = bench.test
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
# DKIM signing (RSA-2048) through OpenDKIM.
smtpd_milters = unix:$dk/opendkim.sock
non_smtpd_milters =
milter_default_action = tempfail
milter_protocol = 6
EOF
  # The standard service lines (without chroot, which would need a copy of /etc inside the
  # queue directory), with the smtp listener replaced by ours.
  {
    echo "127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
    echo "127.0.0.1:$POSTFIX_TLS_PORT inet n - n - - smtpd -o smtpd_tls_wrappermode=yes"
    awk '/^[a-z]/ && $2 != "inet" && $8 != "pipe" { $5 = "n"; print }' /usr/share/postfix/master.cf.dist
  } >"$pf/conf/master.cf"
  chown postfix "$pf/data"

  log "starting Postfix on 127.0.0.1:$POSTFIX_PORT (starttls) and :$POSTFIX_TLS_PORT (implicit)"
  if ! script -qc "postfix -c $pf/conf start" /dev/null >"$pf/start.log" 2>&1; then
    cat "$pf/start.log" >&2
    die "postfix did not start"
  fi
  POSTFIX_STARTED=1
  if ! wait_port "$POSTFIX_PORT" 20 || ! wait_port "$POSTFIX_TLS_PORT" 5; then
    cat "$pf/start.log" >&2; tail -n 20 "$pf/maillog" >&2 2>/dev/null
    die "Postfix did not listen on $POSTFIX_PORT and $POSTFIX_TLS_PORT"
  fi
}

# Waits (at most 60 s) until Postfix has discarded everything it accepted, so a run does not
# pay for the previous run's queue manager backlog.
postfix_settle() {
  local q=$TMP/postfix/queue i n
  for ((i = 0; i < 600; i++)); do
    n=$(find "$q/incoming" "$q/active" "$q/deferred" "$q/maildrop" -type f 2>/dev/null | wc -l)
    (( n == 0 )) && return 0
    sleep 0.1
  done
  log "warning: Postfix still has $n queued files after 60 s"
}

# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------
declare -A SC_DESC=(
  [pooled1]="1 client, pooled connection"
  [pooled]="$CONNECTIONS clients, pooled connections"
  [permsg]="$CONNECTIONS clients, connection per message (full TLS handshake + AUTH)"
  [permsg-resume]="$CONNECTIONS clients, connection per message, TLS session resumption"
  [halfload]="$CONNECTIONS clients pooled, open loop at half the pooled median rate"
)
scenario_args() {  # scenario, server -> loadgen arguments
  case "$1" in
    pooled1) echo "--connections 1 --per-connection 0" ;;
    pooled) echo "--connections $CONNECTIONS --per-connection 0" ;;
    permsg) echo "--connections $CONNECTIONS --per-connection 1" ;;
    permsg-resume) echo "--connections $CONNECTIONS --per-connection 1 --resume" ;;
    halfload) echo "--connections $CONNECTIONS --per-connection 0 --rate ${HALF_RATE[$2]}" ;;
  esac
}
selected() { [[ -z $SCENARIO_FILTER || ",$SCENARIO_FILTER," == *",$1,"* ]]; }

SERVERS=()
(( RUN_SUBRELAY )) && SERVERS+=(subrelay)
(( COMPARE )) && SERVERS+=(postfix)
if [[ $TLS_MODE == starttls ]]; then
  declare -A PORT=([subrelay]=$SUBRELAY_PORT [postfix]=$POSTFIX_PORT)
else
  declare -A PORT=([subrelay]=$SUBRELAY_TLS_PORT [postfix]=$POSTFIX_TLS_PORT)
fi
declare -A HALF_RATE=()
RESULTS=$TMP/results.jsonl
: >"$RESULTS"

# CPU use of the whole machine during a run, from /proc/stat (all cores, all processes).
cpu_sample() { awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat; }

# CPU time (clock ticks) used so far by a server: its processes' user + system time, plus what
# their exited children used (Postfix's master reaps smtpd, cleanup, ...). OpenDKIM counts for Postfix.
server_pids() {
  local p
  case "$1" in
    subrelay) p=$SUBRELAY_PID ;;
    postfix) p=$(tr -d ' ' 2>/dev/null <"$TMP/postfix/queue/pid/master.pid") ;;
  esac
  [[ -n $p ]] || return 0
  echo "$p"
  ps -o pid= --ppid "$p" 2>/dev/null || true
  [[ $1 == postfix && -n $OPENDKIM_PID ]] && echo "$OPENDKIM_PID"
  return 0
}
server_ticks() {
  local total=0 p st
  local -a f
  for p in $(server_pids "$1"); do
    st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    st=${st##*) }   # drop "pid (comm) ": st now starts at field 3 (state)
    read -r -a f <<<"$st"
    total=$((total + f[11] + f[12] + f[13] + f[14]))   # utime stime cutime cstime (fields 14-17)
  done
  echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

idem_args() {  # server -> loadgen arguments for --idempotency
  [[ $IDEM_MODE == on && $1 != postfix ]] && echo "--idempotency-keys"
  return 0
}

run_one() {  # scenario server run
  local sc=$1 srv=$2 run=$3 out b0 t0 b1 t1 s0 s1
  [[ $srv == postfix ]] && postfix_settle
  s0=$(server_ticks "$srv")
  read -r b0 t0 < <(cpu_sample)
  # shellcheck disable=SC2046
  out=$("$LOADGEN" --host 127.0.0.1 --port "${PORT[$srv]}" --tls "$TLS_MODE" --user bench --password "$PASSWORD" \
        --from bench@bench.test --to rcpt@example.test --size "$SIZE" --pipelining --threads "$THREADS" \
        --duration "$DURATION" --timeout 30 --max-time $((DURATION * 4 + 60)) \
        --label "$srv/$sc/$run" --json $(scenario_args "$sc" "$srv") $(idem_args "$srv")) || true
  read -r b1 t1 < <(cpu_sample)
  # Postfix finishes each message after the reply (queue manager, discard): count that work too.
  [[ $srv == postfix ]] && postfix_settle
  s1=$(server_ticks "$srv")
  [[ $out == \{* ]] || { log "loadgen printed no result for $srv/$sc/$run"; out='{"messages_ok":0,"messages_failed":0,"first_error":"loadgen failed"}'; }
  local busy
  busy=$(awk -v b="$((b1 - b0))" -v t="$((t1 - t0))" 'BEGIN { printf "%.1f", (t > 0 ? 100 * b / t : 0) }')
  local srv_cpu
  srv_cpu=$(awk -v t="$((s1 - s0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
  out="{\"scenario\":\"$sc\",\"server\":\"$srv\",\"run\":$run,\"machine_busy_pct\":$busy,\"server_cpu_s\":$srv_cpu,\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$out}"
  echo "$out" >>"$RESULTS"
  [[ -n $JSON_OUT ]] && echo "$out" >>"$JSON_OUT"
  /usr/bin/python3 - "$out" <<'EOF' >&2
import json, sys
r = json.loads(sys.argv[1]); x = r["result"]; l = x.get("latency_ms", {})
ok = x.get("messages_ok", 0)
msg = "  %-8s %-13s run %d: %8.1f msg/s  p50 %6.2f  p99 %7.2f ms  ok %d failed %d  server cpu %.2f ms/msg  client cpu %s%%  machine busy %s%%" % (
    r["server"], r["scenario"], r["run"], x.get("msgs_per_s", 0), l.get("p50", 0), l.get("p99", 0),
    ok, x.get("messages_failed", 0), 1000 * r["server_cpu_s"] / ok if ok else 0,
    x.get("client_cpu_pct_of_one_core", "?"), r["machine_busy_pct"])
if x.get("first_error"): msg += "  first error: " + x["first_error"]
print(msg)
EOF
}

half_rate() {  # scenario server
  /usr/bin/python3 - "$RESULTS" "$1" "$2" <<'EOF'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
v = [r["result"].get("msgs_per_s", 0) for r in rs if r["scenario"] == sys.argv[2] and r["server"] == sys.argv[3]]
print("%.1f" % (statistics.median(v) / 2 if v else 0))
EOF
}

(( RUN_SUBRELAY )) && start_subrelay
(( COMPARE )) && start_postfix

log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $RUNS run(s) of ${DURATION} s per scenario and server"
if awk -v n="$(nproc)" '{ exit !($1 > n / 2) }' /proc/loadavg; then
  log "WARNING: other processes are keeping this machine busy (load average above): figures will be low and noisy"
fi
for sc in "${SCENARIOS[@]}"; do
  selected "$sc" || continue
  if [[ $sc == halfload ]]; then
    for srv in "${SERVERS[@]}"; do
      HALF_RATE[$srv]=$(half_rate pooled "$srv")
      if [[ ${HALF_RATE[$srv]} == 0.0 ]]; then
        log "no pooled result for $srv: running the pooled scenario once to find the rate"
        run_one pooled "$srv" 0
        HALF_RATE[$srv]=$(half_rate pooled "$srv")
      fi
    done
  fi
  log "scenario $sc: ${SC_DESC[$sc]}"
  for ((run = 1; run <= RUNS; run++)); do
    for srv in "${SERVERS[@]}"; do
      [[ $sc == halfload && ${HALF_RATE[$srv]} == 0.0 ]] && continue
      run_one "$sc" "$srv" "$run"
    done
  done
done

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
/usr/bin/python3 - "$RESULTS" "$CONNECTIONS" "$SIZE" "$DURATION" "$SUBRELAY_DKIM" "$TLS_MODE" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
conns, size, duration, subrelay_dkim, tls_mode = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
order = ["pooled1", "pooled", "permsg", "permsg-resume", "halfload"]
names = {"pooled1": "1 client pooled", "pooled": conns + " clients pooled",
         "permsg": conns + " clients, conn/msg", "permsg-resume": conns + " cl. conn/msg+resume",
         "halfload": "half load, pooled"}
servers = [s for s in ("subrelay", "postfix") if any(r["server"] == s for r in rows)]

def med(v):
    return statistics.median(v) if v else 0.0

print()
print("Submission benchmark: %s-byte messages, %s + AUTH PLAIN, pipelining, %s s per run" % (
    size, "STARTTLS" if tls_mode == "starttls" else "implicit TLS", duration))
print("latency = MAIL FROM sent -> reply to the final dot; runs with run number 0 only found the half-load rate")
print()
hdr = "%-22s %-9s %-5s %10s %9s %9s %9s %9s %8s %7s %8s %6s %6s" % (
    "scenario", "server", "run", "msg/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "conn/s", "failed",
    "srv cpu", "cli%", "busy%")
def cpu_per_msg(r):
    ok = r["result"].get("messages_ok", 0)
    return 1000 * r.get("server_cpu_s", 0) / ok if ok else 0
print(hdr)
print("-" * len(hdr))
med_rate, med_p99, med_cpu, med_due_p99 = {}, {}, {}, {}
for sc in order:
    for srv in servers:
        rs = [r for r in rows if r["scenario"] == sc and r["server"] == srv and r["run"] > 0]
        if not rs:
            continue
        for r in rs:
            x = r["result"]; l = x.get("latency_ms", {})
            extra = "  target %.0f" % x["rate_target"] if x.get("rate_target") else ""
            if x.get("first_error"):
                extra += "  first error: " + x["first_error"][:100]
            print("%-22s %-9s %-5d %10.1f %9.2f %9.2f %9.2f %9.2f %8.1f %7d %8.3f %6.0f %6.0f%s" % (
                names[sc], srv, r["run"], x.get("msgs_per_s", 0), l.get("p50", 0), l.get("p90", 0), l.get("p99", 0),
                l.get("max", 0), x.get("connections_per_s", 0), x.get("messages_failed", 0), cpu_per_msg(r),
                x.get("client_cpu_pct_of_one_core", 0), r["machine_busy_pct"], extra))
        g = lambda f: med([f(r["result"]) for r in rs])
        med_rate[sc, srv] = g(lambda x: x.get("msgs_per_s", 0))
        med_p99[sc, srv] = g(lambda x: x.get("latency_ms", {}).get("p99", 0))
        med_due_p99[sc, srv] = g(lambda x: x.get("latency_from_due_ms", {}).get("p99", 0))
        med_cpu[sc, srv] = med([cpu_per_msg(r) for r in rs])
        print("%-22s %-9s %-5s %10.1f %9.2f %9.2f %9.2f %9.2f %8.1f %7d %8.3f %6.0f %6.0f" % (
            names[sc], srv, "MED", med_rate[sc, srv],
            g(lambda x: x.get("latency_ms", {}).get("p50", 0)), g(lambda x: x.get("latency_ms", {}).get("p90", 0)),
            med_p99[sc, srv], g(lambda x: x.get("latency_ms", {}).get("max", 0)),
            g(lambda x: x.get("connections_per_s", 0)), int(g(lambda x: x.get("messages_failed", 0))),
            med_cpu[sc, srv], g(lambda x: x.get("client_cpu_pct_of_one_core", 0)),
            med([r["machine_busy_pct"] for r in rs])))
    if any(sc == k[0] for k in med_rate):
        print()

print("Medians:")
for sc in order:
    parts = []
    for srv in servers:
        if (sc, srv) in med_rate:
            if sc == "halfload":
                parts.append("%s %.1f msg/s (p99 %.2f ms, from due time %.2f ms, %.2f CPU ms/msg)" % (
                    srv, med_rate[sc, srv], med_p99[sc, srv], med_due_p99[sc, srv], med_cpu[sc, srv]))
            else:
                parts.append("%s %.1f msg/s (p99 %.2f ms, %.2f CPU ms/msg)" % (
                    srv, med_rate[sc, srv], med_p99[sc, srv], med_cpu[sc, srv]))
    if not parts:
        continue
    line = "  %-22s %s" % (names[sc], ";  ".join(parts))
    if ("subrelay" in servers and "postfix" in servers and (sc, "subrelay") in med_rate and (sc, "postfix") in med_rate):
        if sc == "halfload":
            if med_p99[sc, "postfix"] > 0:
                line += ";  p99 subrelay/postfix = %.2f" % (med_p99[sc, "subrelay"] / med_p99[sc, "postfix"])
        elif med_rate[sc, "postfix"] > 0:
            line += ";  ratio subrelay/postfix = %.2fx" % (med_rate[sc, "subrelay"] / med_rate[sc, "postfix"])
            if med_cpu[sc, "subrelay"] > 0:
                line += " (CPU per message: postfix/subrelay = %.1fx)" % (med_cpu[sc, "postfix"] / med_cpu[sc, "subrelay"])
    if sc == "halfload" and (sc, "subrelay") in med_p99:
        worst = max(med_p99[sc, "subrelay"], med_due_p99[sc, "subrelay"])
        line += ";  target p99 < 50 ms: %s" % ("met" if 0 < worst < 50 else "NOT met")
    print(line)
print()
if subrelay_dkim == "no":
    print("NOTE: subrelay did not DKIM-sign its probe message: Postfix + OpenDKIM signs every message (RSA-2048),")
    print("      so the ratios above compare unequal work.")
elif subrelay_dkim == "yes":
    print("Both servers DKIM-sign every message with the same RSA-2048 key.")
elif subrelay_dkim == "dual":
    print("subrelay signs every message twice (RSA-2048 + Ed25519, --dkim dual); Postfix + OpenDKIM once (RSA-2048).")
elif subrelay_dkim == "none":
    print("subrelay signs nothing (--dkim none); Postfix + OpenDKIM, when compared, signs with RSA-2048.")
print("srv cpu = server CPU ms per accepted message (Postfix: all its processes + OpenDKIM, measured until its queue is empty);")
print("cli% = loadgen CPU as % of one core; busy% = whole machine (both cores, all processes).")
print("Client and server share this machine's 2 cores: client TLS and SMTP work is taken from the server.")
EOF
