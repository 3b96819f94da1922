# The Debian packages the tests need (sourced by tests/run, which installs them as its first stage, and by
# .ci/run, whose lint stage already builds what needs them: libclang for the V4L2 bindings). The list
# with the reason for each package is at the top of tests/run.
faketime_lib=/usr/lib/$(uname -m)-linux-gnu/faketime/libfaketime.so.1

# The missing packages, by what they provide.
missing_packages() {
  command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || echo build-essential
  command -v ip >/dev/null 2>&1 || echo iproute2
  [ -e "$faketime_lib" ] || echo libfaketime
  command -v chromium >/dev/null 2>&1 || echo chromium fonts-dejavu-core
  command -v fusermount3 >/dev/null 2>&1 || echo fuse3
  [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || echo mosquitto
  compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || compgen -G '/usr/lib/*/libclang.so' >/dev/null \
    || echo libclang-dev
  compgen -G '/usr/lib/*/libXNNPACK.so.0' >/dev/null || echo libxnnpack0
}

install_packages() {
  local missing
  missing=$(missing_packages | xargs)
  if [ -z "$missing" ]; then
    echo "every Debian package the tests need is installed"
  else
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null 2>&1 || {
        echo "tests/run: the tests need these Debian packages: $missing; install them as root" >&2
        exit 1
      }
      sudo=(sudo)
    fi
    echo "installing $missing"
    "${sudo[@]}" apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends $missing
  fi
  # The power-cut test mounts through /dev/fuse as root; without it the test fails and says so.
  [ -e /dev/fuse ] || echo "tests/run: no /dev/fuse here: the power-cut test (tests/tests/power_cut.rs) will fail" >&2
}
