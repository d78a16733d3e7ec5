"""``python -m fairseq_ext`` prints the directory to pass as ``--user-dir`` to fairseq's own CLIs."""

from fairseq_ext import USER_DIR

if __name__ == "__main__":
    print(USER_DIR)
