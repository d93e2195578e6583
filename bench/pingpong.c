/* pingpong: MPI latency and bandwidth between rank 0 and the other ranks, as the fasa
 * transport uses them (MPI_BYTE point-to-point messages, polled, from rank 0 to workers and
 * back), for the performance model (bench/perfmodel.py).
 *
 *   mpirun -n N bench/pingpong [--json FILE] [--reps R]
 *
 * Prints and (with --json) writes: lat_us (half the round trip of an 8-byte message, rank 0
 * to rank 1, median of R), bw_gbs (one 8 MiB message each way, rank 0 to rank 1, median),
 * and with N > 2 the fan-in: every worker sends M bytes to rank 0 at once (what a step's
 * candidates do), fanin_gbs = (N - 1) x M / the time until rank 0 holds them all. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int s_cmp(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double s_median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof(*x), s_cmp);
    return x[n / 2];
}

/* Median round-trip seconds of a bytes-long message between rank 0 and rank peer. */
static double s_pingpong(int rank, int peer, size_t bytes, int reps, char *buf)
{
    double *t = malloc((size_t)reps * sizeof(double)), med = 0;
    for (int r = -2; r < reps; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = MPI_Wtime();
        if (rank == 0) {
            MPI_Send(buf, (int)bytes, MPI_BYTE, peer, 1, MPI_COMM_WORLD);
            MPI_Recv(buf, (int)bytes, MPI_BYTE, peer, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == peer) {
            MPI_Recv(buf, (int)bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, (int)bytes, MPI_BYTE, 0, 2, MPI_COMM_WORLD);
        }
        if (r >= 0) t[r] = MPI_Wtime() - t0;
    }
    if (rank == 0) med = s_median(t, reps);
    free(t);
    return med;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size, reps = 200;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *json = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help")) {
            if (rank == 0) puts("usage: mpirun -n N pingpong [--json FILE] [--reps R]");
            MPI_Finalize();
            return 0;
        } else if (i + 1 < argc && !strcmp(argv[i], "--json")) {
            json = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--reps")) {
            reps = atoi(argv[++i]);
        }
    }
    if (size < 2 || reps < 1) {
        if (rank == 0) fprintf(stderr, "pingpong: needs at least 2 ranks and --reps >= 1\n");
        MPI_Finalize();
        return 2;
    }
    const size_t big = (size_t)8 << 20, fan = (size_t)256 << 10;
    char *buf = calloc(1, big);
    const double lat = s_pingpong(rank, 1, 8, reps, buf) / 2;
    const double bw_rt = s_pingpong(rank, 1, big, reps / 10 + 3, buf);
    const double bw = 2.0 * (double)big / bw_rt / 1e9;
    /* Fan-in: every worker sends fan bytes to rank 0 at once. */
    double fanin = 0;
    if (size > 2) {
        char *in = calloc((size_t)size, fan);
        double *t = malloc((size_t)reps * sizeof(double));
        MPI_Request *rq = malloc((size_t)size * sizeof(MPI_Request));
        for (int r = -2; r < reps; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            const double t0 = MPI_Wtime();
            if (rank == 0) {
                for (int p = 1; p < size; p++)
                    MPI_Irecv(in + (size_t)p * fan, (int)fan, MPI_BYTE, p, 3, MPI_COMM_WORLD,
                              &rq[p - 1]);
                MPI_Waitall(size - 1, rq, MPI_STATUSES_IGNORE);
            } else {
                MPI_Send(buf, (int)fan, MPI_BYTE, 0, 3, MPI_COMM_WORLD);
            }
            if (r >= 0) t[r] = MPI_Wtime() - t0;
        }
        if (rank == 0) fanin = (double)(size - 1) * (double)fan / s_median(t, reps) / 1e9;
        free(in), free(t), free(rq);
    }
    if (rank == 0) {
        printf("pingpong: %d ranks; latency %.2f us (8 B, half round trip); bandwidth %.2f GB/s "
               "(8 MiB); fan-in of %d x 256 KiB: %.2f GB/s\n",
               size, lat * 1e6, bw, size - 1, fanin);
        if (json) {
            FILE *f = fopen(json, "w");
            if (f) {
                fprintf(
                    f, "{\"ranks\": %d, \"lat_us\": %.3f, \"bw_gbs\": %.4f, \"fanin_gbs\": %.4f}\n",
                    size, lat * 1e6, bw, fanin);
                fclose(f);
            }
        }
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
