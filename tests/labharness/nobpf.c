/* nobpf.c - LD_PRELOAD shim for the lab's "own mode": bpf(2) fails with EPERM inside libvirtd,
 * so libvirt's cgroup v2 backend reports "Controller 'devices' present=no" and starts guests
 * in their own cgroup with no device filter. The tool under test then installs its own.
 *
 * libvirt calls syscall(SYS_bpf, ...) (glibc has no bpf() wrapper); bpf() is covered too in
 * case a library exports one. Only the libvirtd process is affected: the constructor removes
 * LD_PRELOAD from libvirtd's environment, so the hooks and QEMU it spawns never load the shim
 * (a hook in own mode needs a working bpf(2)), and the name check guards the rest.
 *
 * Build: gcc -shared -fPIC -O2 -Wall -o nobpf.so nobpf.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>

extern char *program_invocation_short_name;

static int in_libvirtd(void)
{
    return strcmp(program_invocation_short_name, "libvirtd") == 0;
}

__attribute__((constructor)) static void drop_preload_for_children(void)
{
    if (in_libvirtd())
        unsetenv("LD_PRELOAD");
}

long syscall(long nr, ...)
{
    static long (*real_syscall)(long, ...);
    long a[6];
    va_list ap;

    va_start(ap, nr);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (nr == SYS_bpf && in_libvirtd()) {
        errno = EPERM;
        return -1;
    }
    if (!real_syscall)
        real_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real_syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}

int bpf(int cmd, void *attr, unsigned int size)
{
    if (in_libvirtd()) {
        errno = EPERM;
        return -1;
    }
    return (int)syscall(SYS_bpf, cmd, attr, size);
}
