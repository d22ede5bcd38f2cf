#!/usr/bin/env bash
# ldns is for packets only (docs/tls-backends.md): with BoringSSL and ldns's
# OpenSSL in one process, any ldns path that reaches libcrypto (keys, DNSSEC, TSIG, DANE,
# its resolver and its random numbers) crashes. This fails when BINARY imports an ldns_
# function that is not in the allow-list below (the packet functions src/dns/codec.cpp uses).
#
#   check_ldns_symbols.sh BINARY
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 BINARY" >&2
  exit 2
fi
bin=$1
if [[ ! -f $bin ]]; then
  echo "$0: $bin: no such file" >&2
  exit 2
fi

allowed=(
  # building a query (RFC 1035 4.1, RFC 6891 OPT)
  ldns_dname_new_frm_str
  ldns_pkt_query_new
  ldns_pkt_set_id
  ldns_pkt_set_edns_udp_size
  ldns_pkt_set_edns_do
  ldns_pkt2wire
  ldns_pkt_free
  # parsing a response
  ldns_wire2pkt
  ldns_pkt_question
  ldns_pkt_answer
  ldns_pkt_authority
  ldns_rr_list_rr_count
  ldns_rr_list_rr
  ldns_rr_owner
  ldns_rr_get_type
  ldns_rr_get_class
  ldns_rr_ttl
  ldns_rr_rd_count
  ldns_rr_rdf
  ldns_rdf_data
  ldns_rdf_size
  ldns_rdf_get_type
)

if ! imported=$(nm -D --undefined-only "$bin" 2>/dev/null | awk '{print $NF}' | sed 's/@.*//' | grep '^ldns_' | sort -u); then
  imported=""
fi
if [[ -z $imported ]]; then
  echo "note: $bin imports no ldns symbol (not linked with dns/ yet?)"
  exit 0
fi

declare -A ok
for s in "${allowed[@]}"; do ok[$s]=1; done
offenders=()
while read -r s; do
  [[ -n ${ok[$s]:-} ]] || offenders+=("$s")
done <<< "$imported"

count=$(wc -l <<< "$imported")
if (( ${#offenders[@]} > 0 )); then
  echo "FAIL: $bin imports ldns functions outside the packet allow-list:"
  printf '  %s\n' "${offenders[@]}"
  echo "(ldns is for packets only: see docs/tls-backends.md and tests/check_ldns_symbols.sh)"
  exit 1
fi
echo "ok: $bin imports $count ldns functions, all in the allow-list"
