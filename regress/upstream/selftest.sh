#!/usr/bin/env bash
# selftest.sh -- bounded self-test of regress/upstream/upstream.py.
#
# Starts the server on a free loopback port (--port 0 --port-file), checks
# every route and option with curl, stops it, and prints `N passed, N failed`.
# Exits 0 only when nothing failed.  Needs bash, curl and python3; takes a few
# seconds (every curl has --max-time, the server has --max-seconds 60).
#
#   regress/upstream/selftest.sh            # PYTHON=... to pick the interpreter
#   VERBOSE=1 regress/upstream/selftest.sh  # also print each passing check
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
# Debian's interpreter when present (fast to start; a pyenv shim costs ~0.5 s a call)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3
else PY=python3; fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/upstream-selftest.XXXXXX")
PASS=0 FAIL=0 SERVER_PID= SERVER2_PID=

cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    [ -n "$SERVER2_PID" ] && kill "$SERVER2_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

ok()   { PASS=$((PASS + 1)); [ -n "${VERBOSE:-}" ] && echo "ok   $1"; return 0; }
bad()  { FAIL=$((FAIL + 1)); echo "FAIL $1${2:+: $2}"; return 0; }
# check NAME ACTUAL EXPECTED
check() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1" "got [$2], want [$3]"; fi; }
# pycheck NAME FILE EXPR: EXPR (python, d = parsed JSON of FILE) must be true
pycheck() {
    local out
    out=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' \
          "$2" "$3" 2>&1) && ok "$1" || bad "$1" "$3 ${out:+($out)} body: $(head -c 300 "$2")"
}
# hdr FILE NAME: value of a response header in a curl -D dump (last one wins)
hdr() { tr -d '\r' < "$1" | awk -v n="$(echo "$2" | tr 'A-Z' 'a-z')" -F': ' \
        'tolower($1) == n { sub(/^[^:]*: /, ""); v = $0 } END { print v }'; }
C() { curl -s --max-time 10 "$@"; }

# ---- start ---------------------------------------------------------------
"$PY" "$HERE/upstream.py" --port 0 --port-file "$TMP/port" --max-seconds 60 >"$TMP/out" 2>"$TMP/err" &
SERVER_PID=$!
# a second one only to see --max-seconds end it by itself (checked at the end)
"$PY" "$HERE/upstream.py" --max-seconds 1 >"$TMP/out2" 2>&1 &
SERVER2_PID=$!
START2=$(date +%s%N)
for _ in $(seq 100); do [ -s "$TMP/port" ] && grep -q listening "$TMP/out" && break; sleep 0.05; done
PORT=$(cat "$TMP/port" 2>/dev/null)
if [ -z "$PORT" ]; then
    bad "server starts" "$(cat "$TMP/err")"; echo "$PASS passed, $FAIL failed"; exit 1
fi
check "prints listening line" "$(cat "$TMP/out")" "listening on 127.0.0.1:$PORT"
B="http://127.0.0.1:$PORT"
check "POST /_reset" "$(C -X POST "$B/_reset")" '{"reset": true}'

# ---- /json echo, methods ---------------------------------------------------
C -H 'X-Test: yes' "$B/json?a=1&a=2&b=x" -o "$TMP/j" -w '%{http_code} %{content_type}' >"$TMP/w"
check "GET /json status, type" "$(cat "$TMP/w")" "200 application/json"
pycheck "GET /json echo" "$TMP/j" \
    'd["method"]=="GET" and d["path"]=="/json" and d["query"]=={"a":["1","2"],"b":"x"} and d["headers"]["x-test"]=="yes" and d["n"]==1 and d["body"] is None'
C -X POST -H 'Content-Type: application/json' -d '{"x": [1, 2]}' "$B/json" -o "$TMP/j"
pycheck "POST json body echoed" "$TMP/j" 'd["method"]=="POST" and d["body"]=={"x":[1,2]} and d["body_is_json"]'
C -X PUT --data-binary 'plain text' "$B/json" -o "$TMP/j"
pycheck "PUT text body echoed" "$TMP/j" 'd["method"]=="PUT" and d["body"]=="plain text" and not d["body_is_json"]'
C -X PATCH -H 'Transfer-Encoding: chunked' --data-binary '[1]' "$B/json" -o "$TMP/j"
pycheck "PATCH chunked body" "$TMP/j" 'd["method"]=="PATCH" and d["body"]==[1]'
C -X DELETE "$B/json" -o "$TMP/j"
pycheck "DELETE" "$TMP/j" 'd["method"]=="DELETE"'
C -I "$B/json" -o /dev/null -D "$TMP/h" -w '%{size_download}' >"$TMP/w"
check "HEAD: no body, has Content-Length" "$(cat "$TMP/w") $([ -n "$(hdr "$TMP/h" Content-Length)" ] && echo cl)" "0 cl"
check "unknown route 404" "$(C -o /dev/null -w '%{http_code}' "$B/nope")" "404"

# ---- keep-alive: two transfers, one connection -----------------------------
check "keep-alive reuses the connection" \
    "$(C -o /dev/null -o /dev/null -w '%{num_connects}' "$B/json?k=1" "$B/json?k=2")" "10"

# ---- status, headers, delays ----------------------------------------------
C "$B/json?status=503" -o "$TMP/j" -w '%{http_code}' >"$TMP/w"
check "status=503" "$(cat "$TMP/w")" "503"
pycheck "status=503 JSON error body" "$TMP/j" 'd["error"]=="Service Unavailable"'
C "$B/json?status=201" -o "$TMP/j" -w '%{http_code}' >"$TMP/w"
check "status=201" "$(cat "$TMP/w")" "201"
pycheck "status=201 keeps echo" "$TMP/j" 'd["method"]=="GET"'
check "status=204 no body" "$(C -o /dev/null -w '%{http_code} %{size_download}' "$B/json?status=204")" "204 0"
C "$B/json?status=429&retry_after=7" -D "$TMP/h" -o /dev/null
check "retry_after header" "$(hdr "$TMP/h" Retry-After)" "7"
C "$B/json?retry_after_date=60" -D "$TMP/h" -o /dev/null
RA=$(hdr "$TMP/h" Retry-After)
"$PY" -c 'import email.utils,sys,time; t=email.utils.parsedate_to_datetime(sys.argv[1]).timestamp(); sys.exit(0 if 55 <= t-time.time() <= 61 else 1)' "$RA" 2>/dev/null \
    && ok "retry_after_date is an HTTP-date ~60 s ahead" || bad "retry_after_date" "[$RA]"
C "$B/json?header=X-One:1&header=X-Two:two%20words" -D "$TMP/h" -o /dev/null
check "header= (repeatable)" "$(hdr "$TMP/h" X-One)/$(hdr "$TMP/h" X-Two)" "1/two words"
T=$(C -o /dev/null -w '%{time_total}' "$B/json?delay_ms=300")
"$PY" -c 'import sys; sys.exit(0 if 0.29 <= float(sys.argv[1]) < 3 else 1)' "$T" \
    && ok "delay_ms=300" || bad "delay_ms=300" "took $T s"

# ---- bodies ------------------------------------------------------------------
C "$B/json?size=5000000" -o "$TMP/big" -w '%{size_download}' >"$TMP/w"
check "size=5000000 length" "$(cat "$TMP/w")" "5000000"
pycheck "size=5000000 is valid JSON with pad" "$TMP/big" 'd["method"]=="GET" and set(d["pad"])=={"x"}'
check "size=64 MB streams" "$(C -o /dev/null -w '%{size_download}' "$B/json?size=67108864")" "67108864"
C "$B/json?body=badjson" -o "$TMP/j" -w '%{content_type}' >"$TMP/w"
check "body=badjson content type" "$(cat "$TMP/w")" "application/json"
"$PY" -c 'import json,sys; json.load(open(sys.argv[1]))' "$TMP/j" 2>/dev/null \
    && bad "body=badjson does not parse" "$(cat "$TMP/j")" || ok "body=badjson does not parse"
check "body=text" "$(C -o /dev/null -w '%{content_type}' "$B/json?body=text")" "text/plain; charset=utf-8"

# ---- failures: reset, hang, partial ----------------------------------------
C -o /dev/null "$B/json?reset=1"; check "reset=1 -> curl exit 56" "$?" "56"
curl -s --max-time 1 -o /dev/null "$B/json?hang=1"; check "hang=1 -> curl exit 28" "$?" "28"
C -o /dev/null "$B/json?partial=1&size=100000"; check "partial=1 -> curl exit 18" "$?" "18"
check "server alive after failures" "$(C -o /dev/null -w '%{http_code}' "$B/json")" "200"

# ---- redirects -----------------------------------------------------------------
check "redirect is 302 with Location" \
    "$(C -o /dev/null -w '%{http_code} %{redirect_url}' "$B/redirect?to=$B/json%3Fr%3D1")" "302 $B/json?r=1"
C -L "$B/redirect?to=/json%3Fr%3D2" -o "$TMP/j" -w '%{num_redirects}' >"$TMP/w"
check "redirect followed" "$(cat "$TMP/w")" "1"
pycheck "redirect target reached" "$TMP/j" 'd["query"]=={"r":"2"}'
C -L --max-redirs 5 -o /dev/null "$B/redirect_loop"; check "redirect_loop -> curl exit 47" "$?" "47"

# ---- pagination --------------------------------------------------------------
CUR= IDS= PAGES=0 LINKS=0 LINKOK=1
while [ $PAGES -lt 20 ]; do
    C "$B/pages?page_size=5&total=23${CUR:+&cursor=$CUR}" -o "$TMP/p" -D "$TMP/h"
    PAGES=$((PAGES + 1))
    # one line: the page's ids (" 1 2 3"), a tab, the next cursor (empty at the end)
    PAGE=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1]))
print("".join(" %d" % i["id"] for i in d["items"]) + "\t" + (d["next_cursor"] or ""))' "$TMP/p")
    IDS="$IDS${PAGE%%$'\t'*}" CUR=${PAGE#*$'\t'}
    LINK=$(hdr "$TMP/h" Link)
    if [ -n "$LINK" ]; then
        LINKS=$((LINKS + 1))
        [ "$LINK" = "<$B/pages?page_size=5&total=23&cursor=$CUR>; rel=\"next\"" ] || LINKOK=0
    fi
    [ -z "$CUR" ] && break
done
check "pagination: all ids once, in order" "$IDS" " $(seq -s ' ' 1 23)"
check "pagination: 5 pages, Link on all but the last" "$PAGES $LINKS $LINKOK" "5 4 1"
check "pagination: bad cursor 400" "$(C -o /dev/null -w '%{http_code}' "$B/pages?cursor=junk")" "400"

# ---- profile -----------------------------------------------------------------
C "$B/profile/jane_doe" -o "$TMP/p1"; C "$B/profile/jane_doe" -o "$TMP/p2"; C "$B/profile/john" -o "$TMP/p3"
check "profile is deterministic" "$(cmp -s "$TMP/p1" "$TMP/p2" && echo same)" "same"
pycheck "profile shape" "$TMP/p1" \
    'd["handle"]=="jane_doe" and all(isinstance(d[k], int) for k in ("followers","following","posts")) and 0 <= d["followers"] < 10**6'
pycheck "profiles differ by handle" "$TMP/p3" "d['followers'] != $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["followers"])' "$TMP/p1")"

# ---- auth, expiry, rate limit ----------------------------------------------
check "require_key: none -> 401" "$(C -o /dev/null -w '%{http_code}' "$B/json?require_key=s3cret")" "401"
check "require_key: wrong -> 401" "$(C -o /dev/null -w '%{http_code}' -H 'X-Api-Key: nope' "$B/json?require_key=s3cret")" "401"
check "require_key: right -> 200" "$(C -o /dev/null -w '%{http_code}' -H 'X-Api-Key: s3cret' "$B/json?require_key=s3cret")" "200"
check "expires in the past -> 403" "$(C -o /dev/null -w '%{http_code}' "$B/json?expires=1000")" "403"
check "expires in the future -> 200" "$(C -o /dev/null -w '%{http_code}' "$B/json?expires=$(( $(date +%s) + 600 ))")" "200"
RL="$B/json?ratelimit=3&window_s=1&bucket=selftest-$$"
CODES=$(for i in 1 2 3 4; do C -o /dev/null -w '%{http_code} ' "$RL"; done)
check "ratelimit=3: 3 x 200 then 429" "$CODES" "200 200 200 429 "
C -D "$TMP/h" -o /dev/null "$RL"
check "429 carries Retry-After: 1" "$(hdr "$TMP/h" Retry-After)" "1"
sleep 1.05
check "window slides: 200 again" "$(C -o /dev/null -w '%{http_code}' "$RL")" "200"

# ---- concurrency: 50 slow requests at once ---------------------------------
URLS=(); for i in $(seq 50); do URLS+=(-o /dev/null "$B/json?delay_ms=500&c=$i"); done
T0=$(date +%s%N)
curl -s --max-time 10 --parallel --parallel-immediate --parallel-max 50 "${URLS[@]}" 2>/dev/null
MS=$(( ($(date +%s%N) - T0) / 1000000 ))
[ "$MS" -lt 2500 ] && ok "50 x delay_ms=500 in parallel (${MS} ms)" || bad "50 parallel delayed requests" "took ${MS} ms"

# ---- stats -------------------------------------------------------------------
C -o /dev/null "$B/json?status=500"   # before the reset: must not be counted
C -X POST -o /dev/null "$B/_reset"
for i in 1 2 3; do C -o /dev/null "$B/json?key=task-1"; done
C -o /dev/null "$B/json?key=task-2&status=503"
C -o /dev/null "$B/pages?key=task-3"
C -o /dev/null "$B/json?reset=1"
C "$B/_stats" -o "$TMP/s"
pycheck "stats: total, by_path" "$TMP/s" 'd["total"]==6 and d["by_path"]=={"/json":5,"/pages":1}'
pycheck "stats: by_status" "$TMP/s" 'd["by_status"]=={"200":4,"503":1} and d["dropped"]["reset"]==1'
pycheck "stats: by_key" "$TMP/s" 'd["by_key"]=={"task-1":3,"task-2":1,"task-3":1}'
C "$B/_stats?status=500&reset=1" -o "$TMP/s" -w '%{http_code}' >"$TMP/w"
check "/_stats ignores failure options" "$(cat "$TMP/w")" "200"
pycheck "stats: /_stats not counted, max_in_flight" "$TMP/s" 'd["total"]==6 and d["max_in_flight"]>=1'

# ---- shutdown ------------------------------------------------------------------
curl -s --max-time 10 -o /dev/null "$B/json?hang=1" & HANGER=$!
sleep 0.2
T0=$(date +%s%N)
kill -TERM "$SERVER_PID"; wait "$SERVER_PID"; RC=$?
MS=$(( ($(date +%s%N) - T0) / 1000000 ))
SERVER_PID=
check "SIGTERM: exit 0 despite a hung connection" "$RC" "0"
[ "$MS" -lt 2000 ] && ok "SIGTERM: exits promptly (${MS} ms)" || bad "SIGTERM exit time" "${MS} ms"
wait "$HANGER" 2>/dev/null
check "nothing on stderr" "$(cat "$TMP/err")" ""
# started at START2 with --max-seconds 1: must be gone within 5 s of its start
while kill -0 "$SERVER2_PID" 2>/dev/null && [ $(( ($(date +%s%N) - START2) / 1000000 )) -lt 5000 ]; do
    sleep 0.1
done
if kill -0 "$SERVER2_PID" 2>/dev/null; then
    bad "--max-seconds 1 ends the server by itself" "still running after 5 s"
else
    wait "$SERVER2_PID"; RC=$?
    SERVER2_PID=
    check "--max-seconds 1 ends the server by itself (exit 0)" "$RC" "0"
    grep -q "max-seconds reached" "$TMP/out2" && ok "--max-seconds says why" || bad "--max-seconds message" "$(cat "$TMP/out2")"
fi

echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
