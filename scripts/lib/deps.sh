# Sourced by scripts/dev and scripts/test: installs the Debian packages a step needs,
# only those missing (apt-get update only when something is missing).
BUILD_PACKAGES=(
  build-essential meson ninja-build pkg-config cmake
  libuv1-dev android-libboringssl-dev libssl-dev libldns-dev
  nlohmann-json3-dev libsqlite3-dev doctest-dev libidn2-dev openssl libmicrohttpd-dev
  libcurl4-gnutls-dev zlib1g-dev
)
# Real peers and clients for the integration tests (docs/testbed.md), clang's
# sanitizer runtimes, Go (test_interop builds a net/smtp client), iproute2 (test_hostile sets up
# addresses in its own network namespace), node/npm for nodemailer, and for the install and
# packaging tests: systemd-analyze (unit hardening), strace (the unit's system call filter
# against what serve calls), groff/man-db (the man page renders without warnings), dpkg-dev
# and adduser (scripts/build-deb, the package's postinst).
TEST_PACKAGES=(
  clang libclang-rt-14-dev sqlite3 python3 swaks libio-socket-inet6-perl
  python3-aiosmtpd python3-aiosmtplib python3-dkim python3-dnspython
  unbound postfix libsasl2-modules sasl2-bin libsasl2-modules-db opendkim opendkim-tools bind9-dnsutils ldnsutils
  libnet-ssleay-perl golang-go iproute2 python3-prometheus-client
  systemd strace groff-base man-db dpkg-dev adduser
)
# Node.js: Debian's nodejs + npm, unless a node with npm is already there (NodeSource's
# nodejs package ships npm itself and conflicts with Debian's npm package).
node_packages() {
  command -v npm >/dev/null 2>&1 || echo "nodejs npm"
}

install_packages() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> installing: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # postfix asks a debconf question; answer it so the install never blocks.
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
