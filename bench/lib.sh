# bench/lib.sh — sourced by the scripts in bench/.

# require_plain_build SO: refuse to measure a pg_beat.so compiled with
# assertions.  `make test` builds one in the tree (-DUSE_ASSERT_CHECKING,
# see regress/run-tests) and installs it, and a later `make install` reuses
# its objects; only such a build calls ExceptionalCondition.
require_plain_build() {
    local syms
    syms=$(nm -D "$1" 2>/dev/null) || { echo "cannot read the symbols of $1 (nm)" >&2; exit 1; }
    if [[ $syms == *ExceptionalCondition* ]]; then
        echo "$1 was built with assertions (as make test builds it);" \
             "measure a plain build: make clean install" >&2
        exit 1
    fi
}
