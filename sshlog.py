"""sshlog: watch OpenSSH sessions through eBPF (skeleton, being filled in)."""
import sys

__version__ = "0.1.0"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["version"]:
        print("sshlog %s" % __version__)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
