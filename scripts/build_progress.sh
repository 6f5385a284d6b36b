# Sourced by scripts/setup_env.sh and scripts/oldest_env.sh. `build_progress T0` reads a build's
# output (setup.py through pip -v, or setup.py build_ext) and shows setup.py's own lines, ninja's
# [done/total] for each compiled file with the seconds since T0, and the link: a few dozen lines
# instead of thousands (the caller keeps the full output in a log).
build_progress() {
  local t0=$1 line n src
  while IFS= read -r line; do
    line=${line#"${line%%[! ]*}"}  # pip indents the build's output
    case $line in
      "vtattn: "*) echo "  ${line#vtattn: }" ;;
      \[[0-9]*/[0-9]*\]*" -c "*)
        n=${line#\[}; src=${line##* -c }; src=${src%% *}
        echo "  [${n%%]*}] ${src#"$PWD/"} (+$((SECONDS - t0))s)" ;;
      *" -shared "*) echo "  linking (+$((SECONDS - t0))s)" ;;
    esac
  done
}
