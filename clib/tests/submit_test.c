/*
 * dlogd-submit-test: submit each file with libdlogd and print the outcome.
 *
 * Usage: dlogd-submit-test KEYWORD FILE...
 * Prints "OK <spool entry>" or "ERR <errno name> <message>" per file, in order;
 * exits 1 if any file failed, 2 on bad usage. Used by tests/process/test_clib.py
 * to drive the library as an ordinary (non-Python) program would.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "dlogd.h"

int main(int argc, char **argv)
{
    int failed = 0;

    if (argc < 3) {
        fprintf(stderr, "usage: %s KEYWORD FILE...\n", argv[0]);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        if (dlogd_submit(argv[i], argv[1]) == 0) {
            printf("OK %s\n", dlogd_last_message());
        } else {
            const char *name = strerrorname_np(errno);
            printf("ERR %s %s\n", name ? name : "?", dlogd_last_message());
            failed = 1;
        }
    }
    return fclose(stdout) == 0 ? failed : 1;
}
