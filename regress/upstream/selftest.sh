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

# ---- faults per API key ----------------------------------------------------
# jcheck NAME EXPR FILE...: EXPR (python; d = the parsed JSON FILEs, p = d[0], x = d[-1])
# must be true
jcheck() {
    local name=$1 expr=$2 out; shift 2
    out=$("$PY" -c 'import json,sys; d=[json.load(open(f)) for f in sys.argv[2:]]; p, x = d[0], d[-1]; sys.exit(0 if eval(sys.argv[1]) else 1)' \
          "$expr" "$@" 2>&1) && ok "$name" || bad "$name" "$expr ${out:+($out)}"
}
F() { C -X POST -H 'Content-Type: application/json' --data-binary "$1" "$B/_faults"; }
code() { C -o /dev/null -w '%{http_code}' "$@"; }
C -X POST -o /dev/null "$B/_reset"
check "POST /_faults answers the active count" \
    "$(F '{"KEY_A": {"status": 429, "retry_after": 2}, "KEY_B": {"status": 401}}')" '{"faults": 2}'
C -H 'X-Api-Key: KEY_A' -D "$TMP/h" -o "$TMP/j" -w '%{http_code}' "$B/json" >"$TMP/w"
check "fault: X-Api-Key KEY_A -> 429 + Retry-After" "$(cat "$TMP/w") $(hdr "$TMP/h" Retry-After)" "429 2"
pycheck "fault: default error body" "$TMP/j" 'd["error"]=="Too Many Requests" and d["status"]==429 and "method" not in d'
check "fault: Bearer KEY_B -> 401" "$(code -H 'Authorization: Bearer KEY_B' "$B/json")" "401"
check "fault: api_key=KEY_B -> 401" "$(code "$B/json?api_key=KEY_B")" "401"
check "fault: other keys and no key still work" \
    "$(code -H 'X-Api-Key: KEY_OK' "$B/json") $(code "$B/json")" "200 200"
check "fault: X-Api-Key wins over Bearer" "$(code -H 'X-Api-Key: KEY_OK' -H 'Authorization: Bearer KEY_B' "$B/json")" "200"
check "fault: Bearer wins over api_key=" "$(code -H 'Authorization: Bearer KEY_OK' "$B/json?api_key=KEY_B")" "200"
check "fault: not Bearer scheme -> no key" "$(code -H 'Authorization: Basic KEY_B' "$B/json")" "200"
check "fault: options do not change it (status=, reset=, hang=)" \
    "$(code -H 'X-Api-Key: KEY_B' "$B/json?status=503&reset=1&hang=1&body=html")" "401"
T=$(C -o /dev/null -w '%{http_code} %{time_total}' -H 'X-Api-Key: KEY_B' "$B/json?delay_ms=300")
"$PY" -c 'import sys; c, t = sys.argv[1].split(); sys.exit(0 if c == "401" and 0.29 <= float(t) < 3 else 1)' "$T" \
    && ok "fault: answered after delay_ms" || bad "fault after delay_ms" "$T"
check "fault: applies to persona routes" "$(code -H 'X-Api-Key: KEY_A' "$B/acme/v1/profiles/jane_doe")" "429"
check "POST merges; a key given again is replaced" "$(F '{"KEY_B": {"status": 500}, "KEY_C": {"status": 503, "count": 2}}')" '{"faults": 3}'
check "fault replaced: KEY_B -> 500" "$(code -H 'X-Api-Key: KEY_B' "$B/json")" "500"
check "fault count=2: first" "$(code -H 'X-Api-Key: KEY_C' "$B/json")" "503"
C "$B/_faults" -o "$TMP/f"
pycheck "GET /_faults lists remaining count and seconds" "$TMP/f" \
    'sorted(d["faults"])==["KEY_A","KEY_B","KEY_C"] and d["faults"]["KEY_C"]["remaining_count"]==1 and d["faults"]["KEY_A"]=={"status":429,"retry_after":2,"remaining_count":None,"remaining_s":None}'
check "fault count=2: second, then gone" \
    "$(code -H 'X-Api-Key: KEY_C' "$B/json") $(code -H 'X-Api-Key: KEY_C' "$B/json")" "503 200"
C "$B/_faults" -o "$TMP/f"
pycheck "GET /_faults: a used-up fault is gone" "$TMP/f" 'sorted(d["faults"])==["KEY_A","KEY_B"]'
check "fault for_s=1" "$(F '{"KEY_T": {"status": 429, "for_s": 1}}')" '{"faults": 3}'
C "$B/_faults" -o "$TMP/f"
pycheck "GET /_faults: remaining_s" "$TMP/f" '0 < d["faults"]["KEY_T"]["remaining_s"] <= 1'
check "fault for_s: applies at first" "$(code -H 'X-Api-Key: KEY_T' "$B/json")" "429"
sleep 1.05
check "fault for_s: vanishes by itself" "$(code -H 'X-Api-Key: KEY_T' "$B/json")" "200"
C "$B/_faults" -o "$TMP/f"
pycheck "GET /_faults: an expired fault is gone" "$TMP/f" '"KEY_T" not in d["faults"]'
F '{"KEY_D": {"status": 403, "body": {"code": "quota"}, "headers": {"X-Reason": "quota", "Content-Type": "application/problem+json"}}}' >/dev/null
C -H 'X-Api-Key: KEY_D' -D "$TMP/h" -o "$TMP/j" -w '%{http_code} %{content_type}' "$B/json" >"$TMP/w"
check "fault body and headers: status, Content-Type" "$(cat "$TMP/w") $(hdr "$TMP/h" X-Reason)" "403 application/problem+json quota"
pycheck "fault body and headers: body" "$TMP/j" 'd=={"code":"quota"}'
F '{"KEY_E": {"status": 200, "headers": {"X-Quota-Left": 5}}, "KEY_F": {"status": 200, "body": {"data": null}}}' >/dev/null
C -H 'X-Api-Key: KEY_E' -D "$TMP/h" -o "$TMP/j" -w '%{http_code}' "$B/json?status=201" >"$TMP/w"
check "2xx fault without body: route answers (options apply), headers added" "$(cat "$TMP/w") $(hdr "$TMP/h" X-Quota-Left)" "201 5"
pycheck "2xx fault without body: the route's own body" "$TMP/j" 'd["method"]=="GET" and d["path"]=="/json"'
C -H 'X-Api-Key: KEY_F' -o "$TMP/j" -w '%{http_code}' "$B/json" >"$TMP/w"
check "2xx fault with body: status" "$(cat "$TMP/w")" "200"
pycheck "2xx fault with body: the fault's body" "$TMP/j" 'd=={"data":None}'
check "fault 204 with a body: sent without one" "$(F '{"KEY_G": {"status": 204, "body": {}}}' >/dev/null; C -H 'X-Api-Key: KEY_G' -o /dev/null -w '%{http_code} %{size_download}' "$B/json")" "204 0"
check "POST /_faults: bad status -> 400" "$(C -o /dev/null -w '%{http_code}' -X POST -d '{"K": {"status": 99}}' "$B/_faults")" "400"
check "POST /_faults: not JSON -> 400" "$(C -o /dev/null -w '%{http_code}' -X POST -d 'nope' "$B/_faults")" "400"
check "POST /_faults: unknown field -> 400" "$(C -o /dev/null -w '%{http_code}' -X POST -d '{"K": {"status": 429, "retry-after": 1}}' "$B/_faults")" "400"
check "POST /_faults: bad count/for_s -> 400" \
    "$(C -o /dev/null -w '%{http_code}' -X POST -d '{"K": {"status": 429, "count": 0}}' "$B/_faults") $(C -o /dev/null -w '%{http_code}' -X POST -d '{"K": {"status": 429, "for_s": -1}}' "$B/_faults")" "400 400"
check "POST /_faults: all or nothing" \
    "$(C -o /dev/null -w '%{http_code}' -X POST -d '{"GOOD": {"status": 500}, "BAD": {"status": "x"}}' "$B/_faults") $(code -H 'X-Api-Key: GOOD' "$B/json")" "400 200"
check "PUT /_faults -> 405" "$(C -o /dev/null -w '%{http_code}' -X PUT "$B/_faults")" "405"
check "/_faults ignores options" "$(C -o /dev/null -w '%{http_code}' "$B/_faults?status=500&reset=1")" "200"
check "DELETE /_faults clears them" "$(C -X DELETE "$B/_faults") $(code -H 'X-Api-Key: KEY_B' "$B/json")" '{"faults": 0} 200'
check "GET /_faults: none" "$(C "$B/_faults")" '{"faults": {}}'

# per-API-key counters; POST /_reset clears them and the faults
F '{"KEY_Z": {"status": 500}}' >/dev/null
C -X POST -o /dev/null "$B/_reset"
check "POST /_reset clears the faults" "$(C "$B/_faults") $(code -H 'X-Api-Key: KEY_Z' "$B/json")" '{"faults": {}} 200'
C -X POST -o /dev/null "$B/_reset"
F '{"KEY_A": {"status": 429, "count": 1}}' >/dev/null
C -o /dev/null -H 'X-Api-Key: KEY_A' "$B/json"; C -o /dev/null -H 'Authorization: Bearer KEY_A' "$B/json"
C -o /dev/null "$B/profile/x?api_key=KEY_B"; C -o /dev/null "$B/json"
C "$B/_faults" -o /dev/null
C "$B/_stats" -o "$TMP/s"
pycheck "stats: by_api_key" "$TMP/s" 'd["by_api_key"]=={"KEY_A":2,"KEY_B":1} and d["total"]==4'
pycheck "stats: by_api_key_status" "$TMP/s" 'd["by_api_key_status"]=={"KEY_A":{"429":1,"200":1},"KEY_B":{"200":1}}'
C -X POST -o /dev/null "$B/_reset"
C "$B/_stats" -o "$TMP/s"
pycheck "POST /_reset zeroes by_api_key*" "$TMP/s" 'd["by_api_key"]=={} and d["by_api_key_status"]=={}'

# ---- flaky upstream: fail_pct, limit_pct -------------------------------------
C "$B/profile/x?fail_pct=100" -o "$TMP/j" -w '%{http_code}' >"$TMP/w"
check "fail_pct=100 -> 503" "$(cat "$TMP/w")" "503"
pycheck "fail_pct=100 body" "$TMP/j" 'd=={"error":"flaky upstream"}'
C "$B/profile/x?fail_pct=0" -o "$TMP/j" -w '%{http_code}' >"$TMP/w"
check "fail_pct=0 -> 200" "$(cat "$TMP/w")" "200"
pycheck "fail_pct=0 keeps the route's body" "$TMP/j" 'd["handle"]=="x"'
C "$B/json?limit_pct=100&limit_retry_after=3" -D "$TMP/h" -o "$TMP/j" -w '%{http_code}' >"$TMP/w"
check "limit_pct=100&limit_retry_after=3 -> 429 + Retry-After: 3" "$(cat "$TMP/w") $(hdr "$TMP/h" Retry-After)" "429 3"
pycheck "limit_pct=100 body" "$TMP/j" 'd=={"error":"flaky rate limit"}'
C "$B/json?limit_pct=100" -D "$TMP/h" -o /dev/null
check "limit_retry_after defaults to 1" "$(hdr "$TMP/h" Retry-After)" "1"
check "fail_pct=0&limit_pct=0.0 -> 200" "$(code "$B/json?fail_pct=0&limit_pct=0.0")" "200"
check "fail_pct is drawn before limit_pct" "$(code "$B/json?fail_pct=100&limit_pct=100")" "503"
check "flaky comes before reset=, hang=, require_key=, ratelimit=" \
    "$(code "$B/json?fail_pct=100&reset=1") $(code "$B/json?limit_pct=100&hang=1") $(code "$B/json?fail_pct=100&require_key=K") $(code "$B/json?fail_pct=100&ratelimit=0")" \
    "503 429 503 503"
check "status= does not replace a flaky answer" "$(code "$B/json?fail_pct=100&status=200")" "503"
check "an API-key fault comes first" \
    "$(F '{"KEY_FL": {"status": 401}}' >/dev/null; code -H 'X-Api-Key: KEY_FL' "$B/json?fail_pct=100")" "401"
C -X DELETE -o /dev/null "$B/_faults"
check "bad fail_pct/limit_pct -> 400" \
    "$(code "$B/json?limit_pct=abc") $(code "$B/json?fail_pct=101") $(code "$B/json?fail_pct=-1") $(code "$B/json?fail_pct=nan") $(code "$B/json?limit_pct=")" \
    "400 400 400 400 400"
check "bad limit_retry_after -> 400 (even when no draw hits)" \
    "$(code "$B/json?limit_pct=100&limit_retry_after=x") $(code "$B/json?limit_pct=0&limit_retry_after=-1") $(code "$B/json?limit_retry_after=1.5")" "400 400 400"
C "$B/json?fail_pct=abc" -o "$TMP/j"
pycheck "bad fail_pct: error names it" "$TMP/j" '"fail_pct" in d["error"]'
case $(code "$B/json?fail_pct=0.5&limit_pct=0.5") in 200|503|429) ok "fractional pct accepted" ;;
    *) bad "fractional pct accepted" "$(code "$B/json?fail_pct=0.5&limit_pct=0.5")" ;; esac
# statistics: 200 requests each on one keep-alive connection; binomial(200, 0.5)
# lies in 60..140 and binomial(200, 0.25) in 15..85 all but ~1e-6 of the time
C -X POST -o /dev/null "$B/_reset"
URLS=(); for i in $(seq 200); do URLS+=(-o /dev/null "$B/profile/x?fail_pct=50&key=flaky-f"); done
NF=$(C -w '%{http_code}\n' "${URLS[@]}" | grep -c '^503$')
URLS=(); for i in $(seq 200); do URLS+=(-o /dev/null "$B/json?limit_pct=25&key=flaky-l"); done
C -w '%{http_code}\n' "${URLS[@]}" >"$TMP/codes"
NL=$(grep -c '^429$' "$TMP/codes")
[ "$NF" -ge 60 ] && [ "$NF" -le 140 ] && ok "fail_pct=50: $NF of 200 are 503" || bad "fail_pct=50" "$NF of 200 are 503, want 60..140"
[ "$NL" -ge 15 ] && [ "$NL" -le 85 ] && ok "limit_pct=25: $NL of 200 are 429" || bad "limit_pct=25" "$NL of 200 are 429, want 15..85"
check "limit_pct=25: the others are 200" "$(grep -c '^200$' "$TMP/codes")" "$((200 - NL))"
C "$B/_stats" -o "$TMP/s"
pycheck "flaky answers counted in /_stats" "$TMP/s" \
    "d['total']==400 and d['by_key']=={'flaky-f':200,'flaky-l':200} and d['by_status']=={'503':$NF,'429':$NL,'200':$((400 - NF - NL))}"

# ---- personas: the same profile in four providers' shapes --------------------
for h in jane_doe bob; do
    C "$B/profile/$h" -o "$TMP/p0"; C "$B/acme/v1/profiles/$h" -o "$TMP/pa"
    C "$B/bravo/api/user?username=$h" -o "$TMP/pb"; C "$B/charlie/graph?fields=profile&id=$h" -o "$TMP/pc"
    C "$B/delta/channels/$h" -o "$TMP/pd"
    jcheck "acme profile = canonical ($h)" \
        'x["data"] == {"username": p["handle"], "full_name": p["display_name"], "follower_count": p["followers"], "following_count": p["following"], "media_count": p["posts"], "is_verified": p["verified"], "engagement": p["engagement_rate"], "biography": p["bio"], "profile_pic": p["avatar_url"]}' \
        "$TMP/p0" "$TMP/pa"
    jcheck "bravo profile = canonical, as strings ($h)" \
        '(lambda b: b["handle"]==p["handle"] and b["name"]==p["display_name"] and b["stats"]=={"followers": str(p["followers"]), "following": str(p["following"]), "posts": str(p["posts"])} and b["verified"]==("true" if p["verified"] else "false") and float(b["engagement_rate"])==p["engagement_rate"] and b["avatar"]==p["avatar_url"] and b.get("bio", p["bio"])==p["bio"])(x["user"])' \
        "$TMP/p0" "$TMP/pb"
    jcheck "charlie profile = canonical ($h)" \
        'x["result"][0]["type"]=="profile" and x["result"][0]["attributes"] == {"screen_name": p["handle"], "counts": {"followers": p["followers"], "friends": p["following"], "statuses": p["posts"]}, "verified": p["verified"], "er": p["engagement_rate"], "description": p["bio"], "image": p["avatar_url"]}' \
        "$TMP/p0" "$TMP/pc"
    jcheck "delta channel from canonical ($h)" \
        'x["channel"] == {"slug": p["handle"], "title": p["display_name"], "subscribers": p["followers"], "videos": p["posts"], "views": 50 * p["followers"] + p["posts"]}' \
        "$TMP/p0" "$TMP/pd"
    cp "$TMP/pb" "$TMP/pb_$h"
done
jcheck "bravo: bio omitted for bob, present for jane_doe" '"bio" not in d[0]["user"] and "bio" in d[1]["user"]' "$TMP/pb_bob" "$TMP/pb_jane_doe"
check "bravo user: missing username -> 400" "$(code "$B/bravo/api/user")" "400"
check "charlie graph: fields=other -> 400" "$(code "$B/charlie/graph?fields=media&id=x")" "400"
check "options apply to personas" "$(code "$B/charlie/graph?id=x&status=503") $(code "$B/delta/channels/x?status=429")" "503 429"

# ---- canonical posts, and each persona's pagination --------------------------
C "$B/posts/jane_doe" -o "$TMP/c1"; C "$B/posts/jane_doe" -o "$TMP/c2"
check "posts are deterministic" "$(cmp -s "$TMP/c1" "$TMP/c2" && echo same)" "same"
pycheck "posts: 38 for jane_doe, newest first, shape" "$TMP/c1" \
    'len(d["posts"])==38 and len({x["id"] for x in d["posts"]})==38 and [x["created_at"] for x in d["posts"]]==sorted([x["created_at"] for x in d["posts"]], reverse=True) and all(sorted(x)==["caption","comments","created_at","id","likes"] and isinstance(x["likes"], int) and isinstance(x["comments"], int) and x["created_at"].endswith("Z") for x in d["posts"])'
C "$B/posts/user38" -o "$TMP/c0"
pycheck "posts: user38 has none" "$TMP/c0" 'd=={"posts": []}'
# walk PERSONA HANDLE LIMIT: follow the persona's own next-page signal; writes the
# normalised posts (one JSON line each) to $TMP/walk and prints "pages links last"
walk() {
    local persona=$1 h=$2 n=$3 url next pages=0 links=0 linkok=1
    : >"$TMP/walk"
    case $persona in
        acme) url="$B/acme/v1/profiles/$h/posts?limit=$n" ;;
        bravo) url="$B/bravo/api/posts?username=$h&count=$n" ;;
        charlie) url="$B/charlie/graph/posts?id=$h&limit=$n" ;;
    esac
    while [ $pages -lt 50 ]; do
        C "$url" -o "$TMP/pg" -D "$TMP/h"; pages=$((pages + 1))
        next=$("$PY" - "$persona" "$TMP/pg" "$TMP/walk" <<'PYEOF'
import json, sys
persona, page, acc = sys.argv[1:]
d = json.load(open(page))
if persona == "acme":
    rows = [{"id": x["id"], "created_at": x["taken_at"], "likes": x["like_count"],
             "comments": x["comment_count"], "caption": x["caption"]} for x in d["data"]]
    assert d["paging"]["next_cursor"]  # never null, not even on the last page
    nxt = d["paging"]["next_cursor"] if d["paging"]["has_more"] else ""
elif persona == "bravo":
    rows = [{"id": x["post_id"], "created_at": x["created"], "likes": int(x["metrics"]["likes"]),
             "comments": int(x["metrics"]["comments"]), "caption": x["text"]} for x in d["posts"]]
    assert all(isinstance(x["metrics"]["likes"], str) for x in d["posts"])
    assert d.get("next_page_token", "x") != ""  # absent on the last page, never empty
    nxt = d.get("next_page_token", "")
else:
    rows = [{"id": x["attributes"]["id"], "created_at": x["attributes"]["time"],
             "likes": x["attributes"]["favorites"], "comments": x["attributes"]["replies"],
             "caption": x["attributes"]["text"]} for x in d["result"] if x["type"] == "post"]
    nxt = "-"  # from the Link header
with open(acc, "a") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(nxt)
PYEOF
        ) || { echo "parse-error"; return; }
        if [ "$persona" = charlie ]; then
            next=$(hdr "$TMP/h" Link)
            if [ -n "$next" ]; then
                links=$((links + 1))
                case $next in "<$B/charlie/graph/posts?id=$h&after="*"&limit=$n>; rel=\"next\"") ;; *) linkok=0 ;; esac
                next=${next#<}; next=${next%%>*}
                url=$next
            fi
        else
            case $persona in
                acme) url="$B/acme/v1/profiles/$h/posts?limit=$n&cursor=$next" ;;
                bravo) url="$B/bravo/api/posts?username=$h&count=$n&page_token=$next" ;;
            esac
        fi
        [ -z "$next" ] && break
    done
    echo "$pages $links $linkok"
}
SAME='import json,sys; a=json.load(open(sys.argv[1]))["posts"]; b=[json.loads(l) for l in open(sys.argv[2])]; sys.exit(0 if a==b else 1)'
for persona in acme bravo charlie; do
    R=$(walk $persona jane_doe 7)
    if [ $persona = charlie ]; then want="6 5 1"; else want="6 0 1"; fi
    check "$persona posts: 38 in pages of 7" "$R" "$want"
    "$PY" -c "$SAME" "$TMP/c1" "$TMP/walk" && ok "$persona posts = /posts/jane_doe" || bad "$persona posts = /posts/jane_doe"
    R=$(walk $persona user38 5)
    check "$persona posts: none for user38, one page" "$R $(wc -l <"$TMP/walk")" "1 0 1 0"
done
# acme's quirk: the last page still has a stale next_cursor; following it repeats that page
C "$B/acme/v1/profiles/jane_doe/posts?limit=20" -o "$TMP/a1"
CUR=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["paging"]["next_cursor"])' "$TMP/a1")
C "$B/acme/v1/profiles/jane_doe/posts?limit=20&cursor=$CUR" -o "$TMP/a2"
pycheck "acme last page: has_more false, next_cursor non-null" "$TMP/a2" 'd["paging"]["has_more"] is False and isinstance(d["paging"]["next_cursor"], str) and len(d["data"])==18'
STALE=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["paging"]["next_cursor"])' "$TMP/a2")
C "$B/acme/v1/profiles/jane_doe/posts?limit=20&cursor=$STALE" -o "$TMP/a3"
check "acme stale cursor repeats the last page" "$(cmp -s "$TMP/a2" "$TMP/a3" && echo same)" "same"
C "$B/bravo/api/posts?username=jane_doe&count=40" -o "$TMP/b1"
pycheck "bravo last page: no next_page_token key" "$TMP/b1" '"next_page_token" not in d and len(d["posts"])==38'
C "$B/charlie/graph/posts?id=jane_doe&limit=5&key=walk" -D "$TMP/h" -o /dev/null
case $(hdr "$TMP/h" Link) in *"&limit=5&key=walk>; rel=\"next\"") ok "charlie Link carries options" ;;
    *) bad "charlie Link carries options" "$(hdr "$TMP/h" Link)" ;; esac
C "$B/charlie/graph/posts?id=jane_doe&limit=40" -D "$TMP/h" -o /dev/null
check "charlie last page: no Link" "$(hdr "$TMP/h" Link)" ""
C "$B/acme/v1/profiles/jane_doe/posts?cursor=junk" -o "$TMP/j" -w '%{http_code}' >"$TMP/w"
check "acme: invalid cursor 400" "$(cat "$TMP/w")" "400"
pycheck "invalid cursor body" "$TMP/j" 'd["error"]=="invalid cursor"'
check "bravo/charlie: invalid cursor 400" \
    "$(code "$B/bravo/api/posts?username=jane_doe&page_token=junk") $(code "$B/charlie/graph/posts?id=jane_doe&after=junk")" "400 400"
check "a cursor of another handle or persona is invalid" \
    "$(code "$B/acme/v1/profiles/bob/posts?cursor=$CUR") $(code "$B/bravo/api/posts?username=jane_doe&page_token=$CUR")" "400 400"
check "posts: limit out of range 400" "$(code "$B/acme/v1/profiles/jane_doe/posts?limit=0")" "400"
check "options and faults apply to posts" \
    "$(code "$B/bravo/api/posts?username=jane_doe&status=503") $(F '{"KEY_P": {"status": 401}}' >/dev/null; code "$B/charlie/graph/posts?id=jane_doe&api_key=KEY_P")" "503 401"
C -X DELETE -o /dev/null "$B/_faults"

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
