# Sourced by hack/build-*.sh. Each builds test-only programs from a Go module under
# hack/ into a cache folder shared by every checkout, prints where they are on stdout
# (progress on stderr), and exits at once when they are there already.

# mod_version MODULE GO.MOD prints the version GO.MOD requires of MODULE, from a
# "require MODULE vX" line or a line of a require block, without the go command
# (so the cached path is cheap to compute).
mod_version() {
  awk -v m="$1" '$1 == "require" && $2 == m {print $3; exit} $1 == m && $2 ~ /^v/ {print $2; exit}' "$2"
}

# build_once NAME DIR DONE PRINT: when the command DONE succeeds, runs PRINT and
# exits 0. Otherwise it takes DIR/.lock, waiting (and saying so on stderr) while
# a concurrent run builds into DIR, looks again, and returns with the lock held
# for the caller to build: concurrent runs never build twice.
build_once() {
  local name=$1 dir=$2 is_done=$3 print=$4
  if "$is_done"; then "$print"; exit 0; fi
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  if ! flock -n 9; then
    echo "$name: another build into $dir is running; waiting for it" >&2
    flock 9
  fi
  if "$is_done"; then "$print"; exit 0; fi
}
