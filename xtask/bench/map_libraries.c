// `cargo xtask bench`'s tracer-memory workload: maps the shared objects named on the command
// line executable (as a PyTorch process maps libtorch, cuDNN, cuBLAS: hundreds of MB of code
// and symbol tables), then makes and drops a mapping every 50 ms for 2 s (events whose stacks
// are copied and unwound) and exits.
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st)) { perror(argv[i]); return 1; }
        if (mmap(0, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) { perror("mmap"); return 1; }
        close(fd);
    }
    for (int k = 0; k < 40; k++) {
        void *p = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        munmap(p, 1 << 20);
        usleep(50000);
    }
    return 0;
}
