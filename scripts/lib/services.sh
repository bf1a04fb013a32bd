# Sourced by the GPU scripts: start servers in the background and stop them all.
# Needs PIDFILE (where the started pids are listed).

# start NAME CMD...: runs CMD --listen 127.0.0.1:0 (stdout/stderr in /tmp/NAME.out/.err), waits
# for DSV2_READY (up to 10 min: a full-size model takes a while) and prints the address; fails
# with the server's last log lines when it exits or never gets ready.
start() {
  local name=$1; shift
  "$@" --listen 127.0.0.1:0 >"/tmp/$name.out" 2>"/tmp/$name.err" &
  local pid=$!
  echo "$pid" >>"$PIDFILE"
  for _ in $(seq 3000); do
    if grep -q DSV2_READY "/tmp/$name.out" 2>/dev/null; then awk '/DSV2_READY/{print $2}' "/tmp/$name.out"; return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "$name did not start:" >&2; tail -20 "/tmp/$name.err" >&2; return 1
}

stop_all() {
  [ -f "$PIDFILE" ] && kill $(cat "$PIDFILE") 2>/dev/null
  rm -f "$PIDFILE"
  sleep 1
}
