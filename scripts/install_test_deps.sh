#!/usr/bin/env bash
# System packages the test suite needs beyond pip's: GoogleTest for the C++ suites
# (tests/test_cpp_core.py builds them plain, under ASan+UBSan and under TSan), and libibverbs1,
# which the Mooncake Store client of the cluster tier's tests loads (also over TCP).
#
# GoogleTest comes from the distribution: no PyPI package ships it, the build reaches no other
# source, and its code is not copied into this repository.  Installs it with apt-get when it is
# missing (as root, or through sudo without a password); otherwise fails, saying what to install
# and how to skip the C++ suites on purpose (PYKVSHM_SKIP_CPP_TESTS=1).
set -euo pipefail

have_gtest() {
  [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ]
}

have_ibverbs() {
  ldconfig -p 2>/dev/null | grep 'libibverbs\.so\.1 ' >/dev/null
}

if have_gtest && have_ibverbs; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  fi
fi

if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "install_test_deps: installing libgtest-dev (GoogleTest) / libibverbs1 with apt-get" >&2
  $SUDO apt-get update -qq
  have_gtest || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgtest-dev >/dev/null
  have_ibverbs || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libibverbs1 >/dev/null
fi

if ! have_ibverbs; then
  # Only the cluster tier's tests need it; they fail under PYKVSHM_REQUIRE_TIER=1, skip otherwise.
  echo "install_test_deps: libibverbs1 is missing (apt-get install libibverbs1): the tier's tests cannot run" >&2
fi

if have_gtest; then
  exit 0
fi
cat >&2 <<'MSG'
install_test_deps: GoogleTest is not installed and could not be installed here.
  Debian/Ubuntu: apt-get install libgtest-dev     Fedora: dnf install gtest-devel
  Arch: pacman -S gtest                            macOS: brew install googletest
Without it the C++ suites fail; to skip them on purpose, set PYKVSHM_SKIP_CPP_TESTS=1.
MSG
exit 1
